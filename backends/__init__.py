"""Storage backends for the lake, chosen by URL scheme.

``/path`` or ``file:///path`` -> LocalBackend (the embedded default);
``s3://bucket/prefix``       -> S3Backend (obstore, the AWS credential chain);
``az://container/prefix``    -> AzureBackend (obstore, the Azure credential chain);
``gs://bucket/prefix``       -> GCSBackend (obstore, the Google credential chain).

The three object stores share one implementation (``objstore.py``) and the same guarantees;
``cachehub doctor`` checks that a server really gives them (docs/lake-format.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlparse

from cachehub.errors import ConfigError

from .base import Backend

SCHEMES = {"file": "local", "": "local", "s3": "s3", "az": "azure", "azure": "azure", "abfs": "azure", "gs": "gcs", "gcs": "gcs"}


def open_backend(
    url: str, *, endpoint_url: str | None = None, region: str | None = None, credentials: Mapping[str, str] | None = None
) -> Backend:
    """Open the backend for a lake URL; a clear error names what to install or fix."""
    parsed = urlparse(url)
    scheme = parsed.scheme
    if len(scheme) == 1:  # a Windows drive letter, not a scheme
        scheme = ""
    kind = SCHEMES.get(scheme)
    if kind == "local":
        from .local import LocalBackend

        return LocalBackend(parsed.path if scheme == "file" else url)
    if kind == "s3":
        from .s3 import S3Backend

        return S3Backend(url, endpoint_url=endpoint_url, region=region, credentials=credentials)
    if kind in ("azure", "gcs") and credentials:
        raise ConfigError(
            f"key/secret/token are S3 credentials; a {kind.upper() if kind == 'gcs' else 'Azure'} lake ({url}) takes "
            "its credentials from its own standard environment (docs/configuration.md)"
        )
    if kind == "azure":
        from .azure import AzureBackend

        return AzureBackend(url, endpoint_url=endpoint_url, credentials=credentials)
    if kind == "gcs":
        from .gcs import GCSBackend

        return GCSBackend(url, endpoint_url=endpoint_url, credentials=credentials)
    raise ConfigError(
        f"unsupported lake URL {url!r}: use a directory path, file:///path, s3://BUCKET/PREFIX, "
        "az://CONTAINER/PREFIX or gs://BUCKET/PREFIX"
    )


def runtime_started() -> bool:
    """Has this process used an object-store lake (and so started obstore's Rust threads)?"""
    import sys

    module = sys.modules.get(f"{__name__}.objstore")
    return bool(module and module._RUNTIME_PID)


def objstore_stats():  # type: ignore[no-untyped-def]
    """The object-store request stats of this process, or None if no object store was used."""
    import sys

    module = sys.modules.get(f"{__name__}.objstore")
    return module.STATS if module else None


__all__ = ["Backend", "objstore_stats", "open_backend", "runtime_started"]
