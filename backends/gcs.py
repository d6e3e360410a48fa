"""A lake in a Google Cloud Storage bucket (``gs://BUCKET/PREFIX``), through obstore.

Credentials come from the standard Google chain, read by obstore:
``GOOGLE_APPLICATION_CREDENTIALS`` (a service-account or user key file),
``GOOGLE_SERVICE_ACCOUNT`` / ``GOOGLE_SERVICE_ACCOUNT_KEY``, or the host's metadata server on
Google Cloud. ``--endpoint-url`` (``CACHEHUB_ENDPOINT_URL``) points at a private endpoint or an
emulator; against an ``http://`` endpoint with no credentials configured, requests are sent
with a placeholder token instead of asking a metadata server.

GCS moves a tag by compare-and-swap on the object's **generation**
(``x-goog-if-generation-match``), not its ETag: the compare-and-swap token this backend hands
the lake is the generation, and ``create`` is ``if-generation-match: 0``. Uploads carry no
checksum the service checks (obstore sends none), so push reads each upload back and hashes it.

Tested: the generation compare-and-swap at the unit level (tests/test_backends.py). No GCS
emulator installable from the package registries speaks the XML API obstore uses, so GCS has
not been tested end to end (docs/configuration.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from cachehub.errors import ConfigError

from .objstore import ObjectStoreBackend, check_fork, client_options

try:  # pragma: no cover - import guard
    from obstore.store import GCSStore
except ImportError as exc:  # pragma: no cover
    raise ConfigError("the GCS backend needs obstore: pip install obstore") from exc

_CREDENTIAL_VARS = ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_PATH", "GOOGLE_SERVICE_ACCOUNT_KEY")


class GCSBackend(ObjectStoreBackend):
    provider = "GCS"
    credentials_hint = "check the Google credentials (GOOGLE_APPLICATION_CREDENTIALS, or the host's service account)"
    missing_bucket_codes = ("NoSuchBucket",)

    def __init__(self, url: str, *, endpoint_url: str | None = None, credentials: Mapping[str, str] | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("gs", "gcs") or not parsed.netloc:
            raise ConfigError(f"not a GCS lake URL: {url!r} (expected gs://BUCKET/PREFIX)")
        endpoint = endpoint_url or os.environ.get("STORAGE_EMULATOR_HOST")
        if endpoint and "://" not in endpoint:
            endpoint = f"http://{endpoint}"
        client, retry = client_options(endpoint)
        config: dict[str, Any] = dict(credentials or {})
        if endpoint:
            if endpoint.startswith("http://") and not config and not any(os.environ.get(v) for v in _CREDENTIAL_VARS):
                # an emulator: never ask a metadata server for a token
                config["credential_provider"] = _placeholder_token
            config["base_url"] = endpoint.rstrip("/")
        check_fork()
        store = GCSStore(parsed.netloc, prefix=parsed.path.strip("/") or None, client_options=client, retry_config=retry, **config)
        super().__init__(url.rstrip("/"), store, bucket=parsed.netloc, where=endpoint or "Google Cloud Storage")

    # the compare-and-swap token is the object's generation
    def _token(self, meta: Any) -> str:
        return meta.get("version") or ""

    def _update_mode(self, token: str) -> dict[str, str]:
        return {"e_tag": token, "version": token}


def _placeholder_token() -> dict[str, Any]:
    return {"token": "emulator", "expires_at": None}
