"""A lake in an S3 bucket (AWS, StorageGRID, MinIO, SeaweedFS...), through obstore.

obstore (Rust ``object_store``) is the data path because botocore spends 3-6 ms of CPU per
object and cannot keep up with many small files (docs/performance.md). boto3 is used only to
find credentials along the standard AWS chain (environment, profile, instance role); they are
handed to obstore in memory and never written anywhere.

Tags move by conditional writes (``If-None-Match: *`` to create, ``If-Match: <etag>`` to move);
uploads carry ``x-amz-checksum-sha256`` so the server refuses bytes that were damaged on the way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from cachehub.errors import ConfigError, ConflictError, IntegrityError, LakeError
from cachehub.fsutil import unique_suffix

from .base import Backend, Buffer

try:  # pragma: no cover - import guard
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError
    from obstore.store import S3Store
except ImportError as exc:  # pragma: no cover
    raise ConfigError("the S3 backend needs obstore: pip install obstore") from exc


def _translate(exc: Exception, key: str, endpoint: str) -> Exception:
    """Turn an obstore error into the built-in or cachehub error the core expects."""
    if "<Code>NoSuchBucket</Code>" in str(exc):  # a 404 like a missing key's, but nothing under it can exist
        bucket = str(exc).split("<BucketName>", 1)[-1].split("<", 1)[0] if "<BucketName>" in str(exc) else "the lake's bucket"
        return LakeError(
            f"bucket {bucket!r} does not exist at {endpoint}: check the lake URL (CACHEHUB_LAKE, [lake] url), "
            "or create the bucket",
            key=key,
        )
    if isinstance(exc, FileNotFoundError):
        return exc
    if isinstance(exc, (PreconditionError, AlreadyExistsError)):
        return ConflictError(f"{key} was changed by someone else (precondition failed)", key=key)
    text = str(exc)
    first = text.splitlines()[0] if text else type(exc).__name__
    if "BadDigest" in text or "checksum" in text.lower() and "mismatch" in text.lower():
        return IntegrityError(f"the server rejected {key}: checksum mismatch", key=key)
    if isinstance(exc, PermissionError) or "403" in first or "Forbidden" in text:
        return LakeError(
            f"access denied to {key} at {endpoint}: check the AWS credentials (env, profile or role)", key=key
        )
    if "error sending request" in text or "timed out" in text.lower() or "connection refused" in text.lower():
        deadlines = (
            f"each request may take {os.environ.get('CACHEHUB_S3_REQUEST_TIMEOUT', '20')} s "
            f"(CACHEHUB_S3_REQUEST_TIMEOUT) and is retried for {os.environ.get('CACHEHUB_S3_RETRY_TIMEOUT', '30')} s "
            "(CACHEHUB_S3_RETRY_TIMEOUT)"
        )
        return LakeError(
            f"the lake at {endpoint} did not answer for {key} ({deadlines}): is the server up and reachable? ({first[:200]})",
            key=key,
        )
    return LakeError(f"lake request for {key} failed at {endpoint}: {first[:300]}", key=key)


class S3Backend(Backend):
    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_retries: int | None = None,
        retry_timeout: float | None = None,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(f"not an S3 lake URL: {url!r} (expected s3://BUCKET/PREFIX)")
        self.url = url.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        # the deadlines (docs/configuration.md): a request gives up after REQUEST_TIMEOUT (a frozen
        # server), and a failing request is retried, with backoff, until RETRY_TIMEOUT after its
        # first try (a refused port too); the retry count only caps that
        retries = max_retries if max_retries is not None else int(os.environ.get("CACHEHUB_S3_RETRIES", "100"))
        timeout = retry_timeout if retry_timeout is not None else float(os.environ.get("CACHEHUB_S3_RETRY_TIMEOUT", "30"))
        request_timeout = float(os.environ.get("CACHEHUB_S3_REQUEST_TIMEOUT", "20"))
        config: dict[str, Any] = {"checksum_algorithm": "SHA256"}
        client: dict[str, Any] = {
            "connect_timeout": timedelta(seconds=min(5.0, request_timeout)),
            "timeout": timedelta(seconds=request_timeout),
        }
        if self.endpoint:
            config["endpoint"] = self.endpoint
            config["virtual_hosted_style_request"] = False
            if self.endpoint.startswith("http://"):
                client["allow_http"] = True
        # given (the filesystem's key/secret/token options) or the standard chain; never stored
        _check_fork()
        credentials = dict(credentials) if credentials else _credentials()
        region = region or credentials.pop("region", None) or "us-east-1"
        self._store = S3Store(
            self.bucket,
            prefix=self.prefix or None,
            region=region,
            client_options=client,
            retry_config={"max_retries": retries, "retry_timeout": timedelta(seconds=timeout)},
            **credentials,
            **config,
        )

    # -- metadata ---------------------------------------------------------------------------
    def read(self, key: str) -> tuple[bytes, str]:
        _check_fork()
        try:
            result = obstore.get(self._store, key)
            return bytes(result.bytes()), result.meta["e_tag"] or ""
        except Exception as exc:
            raise _translate(exc, key, self._where) from exc

    def write(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> str:
        mode: Any = "overwrite"
        if if_none_match:
            mode = "create"
        elif if_match is not None:
            mode = {"e_tag": if_match}
        try:
            result = obstore.put(self._store, key, data, mode=mode, use_multipart=False)
        except Exception as exc:
            raise _translate(exc, key, self._where) from exc
        return result["e_tag"] or ""

    def exists(self, key: str) -> bool:
        _check_fork()
        try:
            obstore.head(self._store, key)
            return True
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise _translate(exc, key, self._where) from exc

    def list(self, prefix: str) -> Iterator[str]:
        _check_fork()
        try:
            for batch in obstore.list(self._store, prefix=prefix.rstrip("/") + "/" if prefix else None):
                for meta in batch:
                    yield meta["path"]
        except Exception as exc:
            raise _translate(exc, prefix, self._where) from exc

    def list_dirs(self, prefix: str) -> list[str]:
        try:
            result = obstore.list_with_delimiter(self._store, prefix=prefix.rstrip("/") + "/" if prefix else None)
        except Exception as exc:
            raise _translate(exc, prefix, self._where) from exc
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in result["common_prefixes"])

    def delete(self, key: str) -> None:
        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise _translate(exc, key, self._where) from exc

    def download(self, key: str, dest: Path) -> None:
        _check_fork()
        tmp = dest.with_name(f".{dest.name}.{unique_suffix()}.tmp")
        try:
            result = obstore.get(self._store, key)
            with open(tmp, "wb") as fh:
                for chunk in result:
                    fh.write(chunk)
            os.replace(tmp, dest)
        except Exception as exc:
            raise _translate(exc, key, self._where) from exc
        finally:
            tmp.unlink(missing_ok=True)

    # -- data path --------------------------------------------------------------------------
    async def aexists(self, key: str) -> bool:
        try:
            await obstore.head_async(self._store, key)
            return True
        except FileNotFoundError:
            return False
        except Exception as exc:
            raise _translate(exc, key, self._where) from exc

    async def aget(self, key: str) -> Buffer:
        _check_fork()
        try:
            result = await obstore.get_async(self._store, key)
            return await result.bytes_async()  # obstore.Bytes: a buffer, not copied into bytes
        except Exception as exc:
            raise _translate(exc, key, self._where) from exc

    def read_range(self, key: str, start: int, end: int) -> Buffer:
        _check_fork()
        try:
            return obstore.get_range(self._store, key, start=start, end=end)
        except Exception as exc:
            raise _translate(exc, key, self._where) from exc

    async def aget_range(self, key: str, start: int, end: int) -> Buffer:
        _check_fork()
        try:
            return await obstore.get_range_async(self._store, key, start=start, end=end)
        except Exception as exc:
            raise _translate(exc, key, self._where) from exc

    async def aput(self, key: str, data: bytes, *, sha256: str) -> None:
        # The store is configured with checksum_algorithm=SHA256: obstore sends the checksum of
        # the bytes and the server rejects a body that does not match it. The caller has
        # already checked those bytes against ``sha256``.
        try:
            await obstore.put_async(self._store, key, data, use_multipart=len(data) > 64 * 1024 * 1024)
        except Exception as exc:
            raise _translate(exc, key, self._where) from exc

    async def aput_if_absent(self, key: str, data: Buffer, *, sha256: str) -> bool:
        # One create-only PUT (If-None-Match: *) instead of a HEAD and a PUT: half the requests
        # for new content, and the server spends its CPU on one request, not two. If the object
        # exists, the body was sent for nothing, so push uses this only for small files.
        try:
            await obstore.put_async(self._store, key, data, mode="create", use_multipart=False)
            return True
        except (AlreadyExistsError, PreconditionError):
            return False
        except Exception as exc:
            raise _translate(exc, key, self._where) from exc

    @property
    def _where(self) -> str:
        return self.endpoint or "AWS S3"


_RUNTIME_PID: list[int] = []  # the process whose S3 client started obstore's (Rust, tokio) runtime


def _check_fork() -> None:
    """Fail at once, not hang, in a process forked from one that used S3.

    obstore's runtime threads do not survive ``fork()``: a request from the child waits forever.
    A ``multiprocessing`` pool or a PyTorch DataLoader forked after the parent read the lake
    must start its workers with ``spawn`` or ``forkserver`` instead (docs/loaders.md).
    """
    pid = os.getpid()
    if not _RUNTIME_PID:
        _RUNTIME_PID.append(pid)
    elif _RUNTIME_PID[0] != pid:
        raise LakeError(
            "this process was forked from one that had already used the S3 lake, and the S3 client "
            "(obstore) cannot work after fork(); start worker processes with 'spawn' or 'forkserver' "
            "(multiprocessing.get_context('spawn'), DataLoader(multiprocessing_context='spawn'))"
        )


def _credentials() -> dict[str, Any]:
    """Credentials from the standard AWS chain, or nothing (the store then tries the same chain)."""
    env_key = os.environ.get("AWS_ACCESS_KEY_ID")
    env_secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if env_key and env_secret:
        creds: dict[str, Any] = {"access_key_id": env_key, "secret_access_key": env_secret}
        if os.environ.get("AWS_SESSION_TOKEN"):
            creds["session_token"] = os.environ["AWS_SESSION_TOKEN"]
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            creds["region"] = region
        return creds
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:  # pragma: no cover
        return {}
    session = boto3.Session()
    if session.get_credentials() is None:
        raise ConfigError(
            "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run on a host with a role"
        )
    out: dict[str, Any] = {"credential_provider": Boto3CredentialProvider(session)}
    if session.region_name:
        out["region"] = session.region_name
    return out
