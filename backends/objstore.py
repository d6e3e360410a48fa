"""What every object-store lake has in common: one obstore store behind the Backend interface.

obstore (Rust ``object_store``) speaks S3, Azure Blob and GCS with one API, so the three
backends differ only in how the store is built, how a compare-and-swap token is spelled and
what an error should advise. Everything else lives here once:

- the deadlines (docs/configuration.md): a request gives up after ``CACHEHUB_REQUEST_TIMEOUT``
  (a frozen server) and a failing request is retried, with backoff, until
  ``CACHEHUB_RETRY_TIMEOUT`` after its first try (a refused port too);
- the error translation: FileNotFoundError, ConflictError, IntegrityError or LakeError, each
  naming the key, the server and the fix;
- the safe degradations for servers that lack a guarantee (``cachehub doctor`` finds them and
  records them in the lake marker; ``apply_server_facts`` hands them back here):

  * ranges answered with 200: a ranged read fetches the whole object and slices it;
  * delimiter listings that leave out prefixes holding only deeper keys: ``list_dirs`` is
    derived from the full listing instead.

- the fork guard: obstore's runtime threads do not survive ``fork()``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import AlreadyExistsError, PermissionDeniedError, PreconditionError, UnauthenticatedError

from cachehub.errors import ConflictError, IntegrityError, LakeError
from cachehub.fsutil import unique_suffix

from .base import Backend, Buffer


class RequestStats:
    """Every object-store request of this process: counts, errors by kind, and latency in
    histogram buckets, by operation (``get``, ``put``, ``head``, ``list``, ``delete``). The
    daemon's ``/metrics`` exports them."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = {}  # op -> [count per bucket..., sum, count]
        self.errors: dict[tuple[str, str], int] = {}  # (op, kind) -> count

    def observe(self, op: str, seconds: float, error: Exception | None) -> None:
        with self.lock:
            hist = self.latency.setdefault(op, [0.0] * (len(self.BUCKETS) + 2))
            for i, bound in enumerate(self.BUCKETS):
                if seconds <= bound:
                    hist[i] += 1
            hist[-2] += seconds
            hist[-1] += 1
            if error is not None and not isinstance(error, (FileNotFoundError, ConflictError, AlreadyExistsError, PreconditionError)):
                kind = "timeout" if "did not answer" in str(error) else "denied" if "access denied" in str(error) else "other"
                self.errors[(op, kind)] = self.errors.get((op, kind), 0) + 1


STATS = RequestStats()


@contextlib.contextmanager
def _observed(op: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except Exception as exc:
        STATS.observe(op, time.perf_counter() - started, exc)
        raise
    STATS.observe(op, time.perf_counter() - started, None)


def _timed(op: str) -> Callable[[Callable], Callable]:
    """Record each call's latency and failure in ``STATS`` (sync and async methods alike)."""

    def wrap(fn: Callable) -> Callable:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def arun(*args: Any, **kwargs: Any) -> Any:
                with _observed(op):
                    return await fn(*args, **kwargs)

            return arun

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            with _observed(op):
                return fn(*args, **kwargs)

        return run

    return wrap


_STATUS_DENIED = re.compile(r"status code: 40[13]\b")


def _env(name: str, default: str) -> str:
    """``CACHEHUB_<name>``, else the older S3-only spelling ``CACHEHUB_S3_<name>``, else default."""
    return os.environ.get(f"CACHEHUB_{name}") or os.environ.get(f"CACHEHUB_S3_{name}") or default


def deadlines() -> tuple[float, float, int]:
    """(request timeout, retry timeout, retry cap) from the environment (docs/configuration.md)."""
    return float(_env("REQUEST_TIMEOUT", "20")), float(_env("RETRY_TIMEOUT", "30")), int(_env("RETRIES", "100"))


def client_options(endpoint: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """obstore's client and retry options for the deadlines above."""
    request_timeout, retry_timeout, retries = deadlines()
    client: dict[str, Any] = {
        "connect_timeout": timedelta(seconds=min(5.0, request_timeout)),
        "timeout": timedelta(seconds=request_timeout),
    }
    if endpoint and endpoint.startswith("http://"):
        client["allow_http"] = True
    return client, {"max_retries": retries, "retry_timeout": timedelta(seconds=retry_timeout)}


class ObjectStoreBackend(Backend):
    """A lake in an object store, through one obstore store (``self._store``).

    Subclasses build the store and set ``provider`` (for messages), ``credentials_hint`` (the
    fix for a 403), ``missing_bucket_codes`` (the server's error codes for a missing bucket or
    container) and ``client_checksums`` (whether uploads carry a checksum the server checks).
    """

    provider = "object store"
    credentials_hint = "check the credentials"
    missing_bucket_codes: tuple[str, ...] = ("NoSuchBucket",)
    bucket_word = "bucket"
    client_checksums = False

    def __init__(self, url: str, store: Any, *, bucket: str, where: str) -> None:
        self.url = url
        self.bucket = bucket
        self._store = store
        self._where = where
        self.ranges = True  # False once a server answered a ranged GET with 200
        self.nested_listing = True  # False when doctor found delimiter listings incomplete
        self.server_checksums = True  # False when doctor found the server storing a wrong checksum

    # -- what doctor found -------------------------------------------------------------------
    def apply_server_facts(self, facts: dict[str, Any]) -> None:
        self.ranges = facts.get("ranges", True) is not False
        self.nested_listing = facts.get("nested_listing", True) is not False
        self.server_checksums = facts.get("checksums", True) is not False

    def uploads_verified(self) -> bool:
        return self.client_checksums and self.server_checksums

    # -- compare-and-swap tokens (GCS uses the generation, the others the ETag) ---------------
    def _token(self, meta: Any) -> str:
        return meta.get("e_tag") or ""

    def _update_mode(self, token: str) -> dict[str, str]:
        return {"e_tag": token}

    # -- errors ------------------------------------------------------------------------------
    def _translate(self, exc: Exception, key: str) -> Exception:
        """Turn an obstore error into the built-in or cachehub error the core expects."""
        text = str(exc)
        for code in self.missing_bucket_codes:  # a 404 like a missing key's, but nothing under it can exist
            if f"<Code>{code}</Code>" in text or f'"{code}"' in text:
                return LakeError(
                    f"{self.bucket_word} {self.bucket!r} does not exist at {self._where}: check the lake URL "
                    f"(CACHEHUB_LAKE, [lake] url), or create the {self.bucket_word}",
                    key=key,
                )
        if isinstance(exc, FileNotFoundError):
            return exc
        if isinstance(exc, (PreconditionError, AlreadyExistsError)):
            return ConflictError(f"{key} was changed by someone else (precondition failed)", key=key)
        first = text.splitlines()[0] if text else type(exc).__name__
        if "BadDigest" in text or "checksum" in text.lower() and "mismatch" in text.lower() or "Md5Mismatch" in text:
            return IntegrityError(f"the server rejected {key}: checksum mismatch", key=key)
        if isinstance(exc, (PermissionDeniedError, UnauthenticatedError, PermissionError)) or _STATUS_DENIED.search(text):
            return LakeError(f"access denied to {key} at {self._where}: {self.credentials_hint}", key=key)
        if "error sending request" in text or "timed out" in text.lower() or "connection refused" in text.lower():
            request_timeout, retry_timeout, _ = deadlines()
            return LakeError(
                f"the lake at {self._where} did not answer for {key} (each request may take {request_timeout:g} s "
                f"(CACHEHUB_REQUEST_TIMEOUT) and is retried for {retry_timeout:g} s (CACHEHUB_RETRY_TIMEOUT)): "
                f"is the server up and reachable? ({first[:200]})",
                key=key,
            )
        return LakeError(f"lake request for {key} failed at {self._where}: {first[:300]}", key=key)

    # -- metadata ---------------------------------------------------------------------------
    @_timed("get")
    def read(self, key: str) -> tuple[bytes, str]:
        check_fork()
        try:
            result = obstore.get(self._store, key)
            return bytes(result.bytes()), self._token(result.meta)
        except Exception as exc:
            raise self._translate(exc, key) from exc

    @_timed("put")
    def write(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        check_fork()
        mode: Any = "overwrite"
        if if_none_match:
            mode = "create"
        elif if_match is not None:
            mode = self._update_mode(if_match)
        try:
            result = obstore.put(self._store, key, data, mode=mode, use_multipart=False)
        except Exception as exc:
            raise self._translate(exc, key) from exc
        return self._token(result)

    @_timed("head")
    def exists(self, key: str) -> bool:
        check_fork()
        try:
            obstore.head(self._store, key)
            return True
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise self._translate(exc, key) from exc

    def modified(self, key: str) -> datetime:
        check_fork()
        try:
            return obstore.head(self._store, key)["last_modified"]
        except Exception as exc:
            raise self._translate(exc, key) from exc

    def list(self, prefix: str) -> Iterator[str]:
        check_fork()
        try:
            for batch in obstore.list(self._store, prefix=prefix.rstrip("/") + "/" if prefix else None):
                for meta in batch:
                    yield meta["path"]
        except Exception as exc:
            raise self._translate(exc, prefix) from exc

    @_timed("list")
    def list_dirs(self, prefix: str) -> list[str]:
        check_fork()
        base = prefix.rstrip("/") + "/" if prefix else ""
        if not self.nested_listing:  # the server's delimiter listing is incomplete: derive it
            return sorted({key[len(base) :].split("/", 1)[0] for key in self.list(prefix) if "/" in key[len(base) :]})
        try:
            result = obstore.list_with_delimiter(self._store, prefix=base or None)
        except Exception as exc:
            raise self._translate(exc, prefix) from exc
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in result["common_prefixes"])

    @_timed("delete")
    def delete(self, key: str) -> None:
        check_fork()
        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise self._translate(exc, key) from exc

    @_timed("get")
    def download(self, key: str, dest: Path) -> None:
        check_fork()
        tmp = dest.with_name(f".{dest.name}.{unique_suffix()}.tmp")
        try:
            result = obstore.get(self._store, key)
            with open(tmp, "wb") as fh:
                for chunk in result:
                    fh.write(chunk)
            os.replace(tmp, dest)
        except Exception as exc:
            raise self._translate(exc, key) from exc
        finally:
            tmp.unlink(missing_ok=True)

    # -- data path --------------------------------------------------------------------------
    @_timed("head")
    async def aexists(self, key: str) -> bool:
        check_fork()
        try:
            await obstore.head_async(self._store, key)
            return True
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise self._translate(exc, key) from exc

    @_timed("get")
    async def aget(self, key: str) -> Buffer:
        check_fork()
        try:
            result = await obstore.get_async(self._store, key)
            return await result.bytes_async()  # obstore.Bytes: a buffer, not copied into bytes
        except Exception as exc:
            raise self._translate(exc, key) from exc

    @_timed("get")
    def read_range(self, key: str, start: int, end: int) -> Buffer:
        check_fork()
        try:
            if self.ranges:
                try:
                    return obstore.get_range(self._store, key, start=start, end=end)
                except Exception as exc:
                    if not _not_partial(exc):
                        raise
                    self.ranges = False
            return memoryview(obstore.get(self._store, key).bytes())[start:end]
        except Exception as exc:
            raise self._translate(exc, key) from exc

    @_timed("get")
    async def aget_range(self, key: str, start: int, end: int) -> Buffer:
        check_fork()
        try:
            if self.ranges:
                try:
                    return await obstore.get_range_async(self._store, key, start=start, end=end)
                except Exception as exc:
                    if not _not_partial(exc):
                        raise
                    self.ranges = False  # the server answers ranges with 200: whole objects from now on
            result = await obstore.get_async(self._store, key)
            return memoryview(await result.bytes_async())[start:end]
        except Exception as exc:
            raise self._translate(exc, key) from exc

    async def astream(self, key: str, piece: int) -> AsyncIterator[Buffer]:
        """The object in pieces of about ``piece`` bytes, from one streamed GET."""
        check_fork()
        try:
            result = await obstore.get_async(self._store, key)
            async for chunk in result.stream(min_chunk_size=piece):
                yield chunk
        except Exception as exc:
            raise self._translate(exc, key) from exc

    @_timed("put")
    async def aput(self, key: str, data: bytes, *, sha256: str) -> None:
        check_fork()
        try:
            await obstore.put_async(self._store, key, data, use_multipart=len(data) > 64 * 1024 * 1024)
        except Exception as exc:
            raise self._translate(exc, key) from exc
        await self._verify_upload(key, data, sha256)

    async def areplace(self, key: str, data: bytes, *, sha256: str) -> None:
        await self.aput(key, data, sha256=sha256)

    @_timed("put")
    async def aput_if_absent(self, key: str, data: Buffer, *, sha256: str) -> bool:
        # One create-only PUT instead of a HEAD and a PUT: half the requests for new content.
        # If the object exists, the body was sent for nothing, so push uses this only for small
        # files. On a server that ignores create-only writes this overwrites identical bytes
        # (the key is their hash), which is harmless.
        check_fork()
        try:
            await obstore.put_async(self._store, key, data, mode="create", use_multipart=False)
        except (AlreadyExistsError, PreconditionError):
            return False
        except Exception as exc:
            raise self._translate(exc, key) from exc
        await self._verify_upload(key, data, sha256)
        return True

    async def _verify_upload(self, key: str, data: Buffer, sha256: str) -> None:
        """Client-side verification where the server does not check what it stores: read the
        upload back and hash it; on a mismatch put the known-good bytes again (a few times).

        Never deletes: the key is content-addressed and shared by every commit holding that
        content, so another push may have published it meanwhile."""
        if self.uploads_verified():
            return
        for attempt in range(UPLOAD_ATTEMPTS):
            stored = await self.aget(key)
            if hashlib.sha256(stored).hexdigest() == sha256:
                return
            if attempt + 1 < UPLOAD_ATTEMPTS:
                try:
                    await obstore.put_async(self._store, key, data, use_multipart=len(data) > 64 * 1024 * 1024)  # type: ignore[arg-type]
                except Exception as exc:
                    raise self._translate(exc, key) from exc
        raise IntegrityError(
            f"{self.provider} at {self._where} keeps storing {key} damaged (read back after {UPLOAD_ATTEMPTS} uploads, "
            "because this server does not check upload checksums); nothing was published: check the server, then "
            "re-run the push with --repair",
            key=key,
        )


UPLOAD_ATTEMPTS = 3  # uploads of one object whose read-back does not match, before giving up


def _not_partial(exc: Exception) -> bool:
    """obstore's error for a ranged GET answered with 200 (the whole object)."""
    return "NotPartial" in str(exc) or "non-partial response" in str(exc)


_RUNTIME_PID: list[int] = []  # the process whose client started obstore's (Rust, tokio) runtime


def check_fork() -> None:
    """Fail at once, not hang, in a process forked from one that used an object-store lake.

    obstore's runtime threads do not survive ``fork()``: a request from the child waits forever.
    A ``multiprocessing`` pool or a PyTorch DataLoader forked after the parent read the lake
    must start its workers with ``spawn`` or ``forkserver`` instead (docs/loaders.md).
    """
    pid = os.getpid()
    if not _RUNTIME_PID:
        _RUNTIME_PID.append(pid)
    elif _RUNTIME_PID[0] != pid:
        raise LakeError(
            "this process was forked from one that had already used the object-store lake, and its client "
            "(obstore) cannot work after fork(); start worker processes with 'spawn' or 'forkserver' "
            "(multiprocessing.get_context('spawn'), DataLoader(multiprocessing_context='spawn'))"
        )
