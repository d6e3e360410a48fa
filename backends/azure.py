"""A lake in an Azure Blob Storage container (``az://CONTAINER/PREFIX``), through obstore.

The account and the credentials come from the standard Azure environment, read by obstore:
``AZURE_STORAGE_ACCOUNT_NAME`` with ``AZURE_STORAGE_ACCOUNT_KEY`` or ``AZURE_STORAGE_SAS_TOKEN``,
a service principal (``AZURE_CLIENT_ID``, ``AZURE_CLIENT_SECRET``, ``AZURE_TENANT_ID``),
workload identity (``AZURE_FEDERATED_TOKEN_FILE``), the Azure CLI's login
(``AZURE_USE_AZURE_CLI=true``) or the host's managed identity. ``az://CONTAINER@ACCOUNT/PREFIX``
names the account in the URL instead. ``--endpoint-url`` (``CACHEHUB_ENDPOINT_URL``) points at
an emulator such as Azurite or a private endpoint: ``http://127.0.0.1:10000/devstoreaccount1``.

Tags move by conditional writes (``If-None-Match: *``, ``If-Match: <etag>``), which Blob
Storage honours. Uploads carry no checksum the service checks (obstore sends none), so push
reads each upload back and hashes it (``client_checksums = False``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from cachehub.errors import ConfigError

from .objstore import ObjectStoreBackend, check_fork, client_options

try:  # pragma: no cover - import guard
    from obstore.store import AzureStore
except ImportError as exc:  # pragma: no cover
    raise ConfigError("the Azure backend needs obstore: pip install obstore") from exc


class AzureBackend(ObjectStoreBackend):
    provider = "Azure Blob"
    credentials_hint = (
        "check the Azure credentials (AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY or "
        "AZURE_STORAGE_SAS_TOKEN, a service principal, workload or managed identity)"
    )
    missing_bucket_codes = ("ContainerNotFound",)
    bucket_word = "container"

    def __init__(self, url: str, *, endpoint_url: str | None = None, credentials: Mapping[str, str] | None = None) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("az", "azure", "abfs") or not parsed.netloc:
            raise ConfigError(f"not an Azure lake URL: {url!r} (expected az://CONTAINER/PREFIX)")
        container, _, account = parsed.netloc.partition("@")
        config: dict[str, Any] = dict(credentials or {})
        account = account.split(".", 1)[0] or config.pop("account_name", None) or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
        if not account:
            raise ConfigError(
                f"no Azure storage account for {url!r}: set AZURE_STORAGE_ACCOUNT_NAME or use az://CONTAINER@ACCOUNT/PREFIX"
            )
        endpoint = endpoint_url or os.environ.get("AZURE_STORAGE_ENDPOINT")
        client, retry = client_options(endpoint)
        if endpoint:
            config["endpoint"] = endpoint.rstrip("/")
        check_fork()
        store = AzureStore(
            container,
            prefix=parsed.path.strip("/") or None,
            account_name=account,
            client_options=client,
            retry_config=retry,
            **config,
        )
        super().__init__(url.rstrip("/"), store, bucket=container, where=endpoint or f"Azure account {account}")
