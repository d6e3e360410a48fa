"""Every error cachehub raises on purpose.

Each class mixes in the closest built-in so callers can catch what they already know
(``FileNotFoundError``, ``ValueError``...), carries its context as attributes, and says in its
message what to do next. ``exit_code`` is what the CLI exits with; the codes are documented in
``docs/cli.md`` and never reused for a different meaning.
"""

from __future__ import annotations


class CachehubError(Exception):
    """Base of every error cachehub raises deliberately."""

    exit_code = 1

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        for key, value in context.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return self.message


class ConfigError(CachehubError):
    """The configuration is missing or invalid."""

    exit_code = 13


class NotCachedError(CachehubError, FileNotFoundError):
    """The commit is not materialised at the site."""

    exit_code = 3


class DatasetNotFoundError(CachehubError, LookupError):
    """No dataset of that name in the catalog or the lake."""

    exit_code = 4


class RefNotFoundError(CachehubError, LookupError):
    """The dataset exists but the tag or commit id does not."""

    exit_code = 5


class AmbiguousRefError(CachehubError, LookupError):
    """A commit-id prefix matches more than one commit."""

    exit_code = 6


class InvalidRefError(CachehubError, ValueError):
    """A ``name@ref`` string, dataset name or tag name is malformed."""

    exit_code = 7


class ConflictError(CachehubError):
    """A compare-and-swap lost: somebody else changed the object first."""

    exit_code = 8


class IntegrityError(CachehubError):
    """Bytes do not match the SHA-256 they are addressed by."""

    exit_code = 9


class SiteDamagedError(IntegrityError):
    """Metadata kept at a site (a manifest copy, a metadata file) is missing or damaged and
    could not be restored from the lake; nothing was removed because of it."""


class UnsafePathError(CachehubError, ValueError):
    """A path is absolute, contains ``..`` or NUL, or would escape its root."""

    exit_code = 10


class LakeError(CachehubError, OSError):
    """The lake could not be read or written (server down, permission, network)."""

    exit_code = 11


class ServerGapError(LakeError):
    """The lake's server lacks a guarantee this operation needs (``cachehub doctor`` found it):
    tag compare-and-swap on a server that ignores conditional writes."""

    exit_code = 20


class FormatError(CachehubError):
    """An on-disk or in-lake document has an unknown format or format_version."""

    exit_code = 12


class NoSpaceError(CachehubError, OSError):
    """The site ran out of space; nothing half-written was published."""

    exit_code = 14


class SiteNotFoundError(CachehubError, LookupError):
    """No site of that name is configured."""

    exit_code = 15


class SiteMissingError(CachehubError, FileNotFoundError):
    """A configured site's root does not carry its marker: an unmounted export, a wrong path,
    or a deleted root. cachehub never recreates it."""

    exit_code = 17


class SitePermissionError(CachehubError, PermissionError):
    """The filesystem refused an operation at a site (this user lacks the permission)."""

    exit_code = 18


class SiteIOError(CachehubError, OSError):
    """The filesystem of a site failed (a stale or hung NFS mount, an I/O error)."""

    exit_code = 19
