"""cachehub: cache and version ML datasets across a hybrid cloud.

Quick use from a training script::

    import cachehub
    root = cachehub.resolve("chest-xray@v3")            # local, read-only path (cached already)
    root = cachehub.resolve("chest-xray@v3", fetch=True) # cache it first if needed

Everything else goes through :class:`cachehub.Hub` (see docs/python-api.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    AmbiguousRefError,
    CachehubError,
    ConfigError,
    ConflictError,
    DatasetNotFoundError,
    FormatError,
    IntegrityError,
    InvalidRefError,
    LakeError,
    ServerGapError,
    NoSpaceError,
    NotCachedError,
    RefNotFoundError,
    SiteDamagedError,
    SiteIOError,
    SiteMissingError,
    SiteNotFoundError,
    SitePermissionError,
    UnsafePathError,
)

if TYPE_CHECKING:
    from .api import Hub

__version__ = "0.1.0"

_default: dict[str, Hub] = {}


def default_hub() -> Hub:
    """A Hub for the current environment (one per CACHEHUB_HOME/CACHEHUB_CONFIG/CACHEHUB_LAKE)."""
    key = "|".join(os.environ.get(k, "") for k in ("CACHEHUB_HOME", "CACHEHUB_CONFIG", "CACHEHUB_LAKE", "XDG_DATA_HOME"))
    hub = _default.get(key)
    if hub is None:
        from .api import Hub

        hub = _default[key] = Hub()
    return hub


def resolve(ref: str, site: str | None = None, fetch: bool = False, include: Any = None, exclude: Any = None) -> Path:
    """The local, read-only path of ``ref`` (``name@tag``, ``name@<commit id>``, ``name``) at ``site``.

    Raises NotCachedError (a FileNotFoundError) if it is not cached and ``fetch`` is False.
    ``include``/``exclude`` (glob patterns) name a partial cache: ``cachehub cache --include``.
    """
    return default_hub().resolve(ref, site=site, fetch=fetch, include=include, exclude=exclude)


def use(ref: str, site: str | None = None, fetch: bool = False, run: str | None = None, include: Any = None, exclude: Any = None) -> Any:
    """``with cachehub.use("chest-xray@v3") as path:`` -- the path, leased for the block.

    A leased entry is never evicted; the lease lives on the site root so every host sees it.
    """
    return default_hub().use(ref, site=site, fetch=fetch, run=run, include=include, exclude=exclude)


def __getattr__(name: str) -> object:
    if name == "Hub":
        from .api import Hub

        return Hub
    raise AttributeError(name)


__all__ = [
    "AmbiguousRefError",
    "CachehubError",
    "ConfigError",
    "ConflictError",
    "DatasetNotFoundError",
    "FormatError",
    "Hub",
    "IntegrityError",
    "InvalidRefError",
    "LakeError",
    "ServerGapError",
    "NoSpaceError",
    "NotCachedError",
    "RefNotFoundError",
    "SiteDamagedError",
    "SiteIOError",
    "SiteMissingError",
    "SiteNotFoundError",
    "SitePermissionError",
    "UnsafePathError",
    "default_hub",
    "resolve",
    "use",
]
