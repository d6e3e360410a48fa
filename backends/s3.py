"""A lake in an S3 bucket (AWS, StorageGRID, MinIO, SeaweedFS, Ceph...), through obstore.

obstore (Rust ``object_store``) is the data path because botocore spends 3-6 ms of CPU per
object and cannot keep up with many small files (docs/performance.md). boto3 is used only to
find credentials along the standard AWS chain (environment, profile, instance role); they are
handed to obstore in memory and never written anywhere, and by ``cachehub doctor`` to send one
upload with a deliberately wrong checksum (obstore always sends the right one).

Tags move by conditional writes (``If-None-Match: *`` to create, ``If-Match: <etag>`` to move);
uploads carry ``x-amz-checksum-sha256`` so a server that checks it refuses bytes damaged on the
way. Everything not S3-specific lives in ``objstore.py``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from cachehub.errors import ConfigError

from .objstore import ObjectStoreBackend, check_fork, client_options

try:  # pragma: no cover - import guard
    from obstore.store import S3Store
except ImportError as exc:  # pragma: no cover
    raise ConfigError("the S3 backend needs obstore: pip install obstore") from exc


class S3Backend(ObjectStoreBackend):
    provider = "S3"
    credentials_hint = "check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the host's role)"
    client_checksums = True

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(f"not an S3 lake URL: {url!r} (expected s3://BUCKET/PREFIX)")
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client, retry = client_options(endpoint)
        config: dict[str, Any] = {"checksum_algorithm": "SHA256"}
        if endpoint:
            config["endpoint"] = endpoint
            config["virtual_hosted_style_request"] = False
        # given (the filesystem's key/secret/token options) or the standard chain; never stored
        check_fork()
        credentials = dict(credentials) if credentials else _credentials()
        self.region = region or credentials.pop("region", None) or "us-east-1"
        self.prefix = parsed.path.strip("/")
        self.endpoint = endpoint
        self._credentials = credentials
        store = S3Store(
            parsed.netloc,
            prefix=self.prefix or None,
            region=self.region,
            client_options=client,
            retry_config=retry,
            **credentials,
            **config,
        )
        super().__init__(url.rstrip("/"), store, bucket=parsed.netloc, where=endpoint or "AWS S3")

    def probe_bad_checksum(self, key: str) -> bool | None:
        """Send one upload to ``key`` whose x-amz-checksum-sha256 does not match its body; True
        if the server refused it (cachehub doctor). Uses botocore: obstore always sends the
        right checksum."""
        import boto3
        from botocore.config import Config

        creds = self._credentials
        if "credential_provider" in creds:
            session = boto3.Session()
        else:
            session = boto3.Session(
                aws_access_key_id=creds.get("access_key_id"),
                aws_secret_access_key=creds.get("secret_access_key"),
                aws_session_token=creds.get("session_token"),
            )
        client = session.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, request_checksum_calculation="when_required"),
        )
        wrong = base64.b64encode(hashlib.sha256(b"not the body").digest()).decode()
        full_key = f"{self.prefix}/{key}" if self.prefix else key
        try:
            client.put_object(Bucket=self.bucket, Key=full_key, Body=b"the body", ChecksumSHA256=wrong)
        except Exception as exc:  # botocore's ClientError: BadDigest, InvalidRequest...
            text = str(exc)
            if "BadDigest" in text or "XAmzContentChecksumMismatch" in text or "checksum" in text.lower():
                return True
            raise self._translate(exc, key) from exc
        finally:
            client.close()
        return False


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
