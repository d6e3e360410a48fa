"""Storage backends for the lake, chosen by URL scheme.

``/path`` or ``file:///path`` -> LocalBackend (the embedded default);
``s3://bucket/prefix``       -> S3Backend (obstore data path, AWS credential chain).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlparse

from cachehub.errors import ConfigError

from .base import Backend

SCHEMES = {"file": "local", "": "local", "s3": "s3"}


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
    raise ConfigError(f"unsupported lake URL {url!r}: use a directory path, file:///path or s3://bucket/prefix")


__all__ = ["Backend", "open_backend"]
