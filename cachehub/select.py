"""Selections: the files of a commit a partial cache holds (``--include`` / ``--exclude``).

A ``Selection`` is a list of glob patterns to include (none: every file) and a list to exclude,
matched against the paths of a commit's manifest:

* ``**`` matches any run of characters, ``/`` included (``train/**``, ``**/*.png``);
* ``*`` and ``?`` match within one path segment; ``[abc]`` a character class;
* a pattern without ``/`` matches the file's name in any folder (``*.tmp``), as in
  ``.gitignore``; a pattern with one is matched against the whole path from the top.

A file is selected when it matches some include (or there is none) and no exclude.

A partial cache is a site entry of its own: its id is ``<commit-id>-<16 hex>``, the commit and
a digest of the selection (``entry_id``), so ``ds@v3`` with ``train/**`` and ``ds@v3`` whole,
or with another selection, are separate trees that share the site's objects.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property

from .errors import InvalidRefError

ENTRY_SEP = "-"


@dataclass(frozen=True)
class Selection:
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in (*self.include, *self.exclude):
            if not pattern or pattern.startswith("/") or "\x00" in pattern or any(part == ".." for part in pattern.split("/")):
                raise InvalidRefError(
                    f"bad file pattern {pattern!r}: patterns are relative to the commit's top, e.g. 'train/**' or '*.tmp'"
                )

    @classmethod
    def of(cls, include: object = None, exclude: object = None) -> Selection:
        """From what a caller passes: None, one pattern, or a list of patterns, for each."""

        def patterns(value: object) -> tuple[str, ...]:
            if value is None:
                return ()
            if isinstance(value, str):
                return (value,)
            return tuple(str(v) for v in value)  # type: ignore[attr-defined]

        return cls(patterns(include), patterns(exclude))

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def to_json(self) -> dict:
        return {"include": list(self.include), "exclude": list(self.exclude)}

    @classmethod
    def from_json(cls, body: dict | None) -> Selection:
        return cls.of((body or {}).get("include"), (body or {}).get("exclude"))

    @cached_property
    def digest(self) -> str:
        """16 hex digits naming this selection (order of patterns kept: it is what was asked)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def entry_id(self, commit_id: str) -> str:
        """The site entry holding this selection of ``commit_id`` (the commit id itself if whole)."""
        return f"{commit_id}{ENTRY_SEP}{self.digest}" if self else commit_id

    def flags(self) -> str:
        """The command-line options that name this selection (`` --include 'train/**'``...)."""
        return "".join(f" --include '{p}'" for p in self.include) + "".join(f" --exclude '{p}'" for p in self.exclude)

    def describe(self) -> str:
        parts = [f"include {', '.join(self.include)}"] if self.include else []
        parts += [f"exclude {', '.join(self.exclude)}"] if self.exclude else []
        return "; ".join(parts) or "every file"

    @cached_property
    def _compiled(self) -> tuple[list[re.Pattern[str]], list[re.Pattern[str]]]:
        return [_compile(p) for p in self.include], [_compile(p) for p in self.exclude]

    def matches(self, path: str) -> bool:
        if not self:
            return True
        include, exclude = self._compiled
        if include and not any(p.match(path) for p in include):
            return False
        return not any(p.match(path) for p in exclude)


def commit_of(entry_id: str) -> str:
    """The commit a site entry holds (whole or a selection of it)."""
    return entry_id.partition(ENTRY_SEP)[0]


def _compile(pattern: str) -> re.Pattern[str]:
    anchored = "/" in pattern.rstrip("/")
    pattern = pattern.rstrip("/")
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")  # any folders, or none
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                negate = body.startswith("!")
                members = (body[1:] if negate else body).replace("\\", "\\\\").replace("^", "\\^")  # ranges (a-z) kept
                out.append("[" + ("^" if negate else "") + members + "]")
                i = end + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    body = "".join(out)
    # a folder pattern selects what is below it too ("train" == "train/**")
    return re.compile(("" if anchored else "(?:.*/)?") + body + "(?:/.*)?\\Z")
