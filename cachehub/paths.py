"""Validation of the relative paths stored in manifests (pure, no I/O).

A manifest path is what a training script will see below a commit's root, so it must never be
able to point anywhere else: it is relative, uses '/' as separator, has no empty, '.' or '..'
segment, no NUL or other control character, no backslash, and is valid UTF-8 text.
"""

from __future__ import annotations

import re
import unicodedata

from .errors import UnsafePathError

MAX_PATH_BYTES = 4096
MAX_SEGMENT_BYTES = 255
# Control characters would break the line-oriented manifest and every shell script reading it.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_path(path: str) -> str:
    """Return ``path`` unchanged if it is a safe manifest path, else raise UnsafePathError."""
    if not isinstance(path, str) or not path:
        raise UnsafePathError(f"empty or non-text path {path!r} in manifest", path=path)
    why = _problem(path)
    if why:
        raise UnsafePathError(f"unsafe path {path!r}: {why}", path=path)
    return path


def _problem(path: str) -> str | None:
    if "\x00" in path:
        return "contains NUL"
    if path.startswith("/"):
        return "is absolute"
    if "\\" in path:
        return "contains a backslash"
    if _CONTROL.search(path):
        return "contains a control character (tab, newline...)"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(encoded) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            return "has an empty, '.' or '..' segment"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"has a segment longer than {MAX_SEGMENT_BYTES} bytes"
    if len(path) >= 2 and path[1] == ":" and path[0].isalpha():
        return "looks like a Windows drive path"
    return None


def normalise(path: str) -> str:
    """NFC-normalise a path found on disk so that the same name hashes the same everywhere."""
    return unicodedata.normalize("NFC", path)


def sort_key(path: str) -> bytes:
    """The order manifests are sorted in: bytewise UTF-8, which equals Python's str order."""
    return path.encode("utf-8")
