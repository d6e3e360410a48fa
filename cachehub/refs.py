"""Parsing and validating dataset names, tag names and ``name@ref`` strings (pure, no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidRefError

# Dataset and tag names become path segments in the lake and on sites, so they are kept to a
# conservative alphabet: no '/', no '@', no leading '.' or '-', at most 128 characters.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_COMMIT_PREFIX = re.compile(r"[0-9a-f]{4,64}")
LATEST = "latest"
RESERVED_TAGS = frozenset({LATEST})


@dataclass(frozen=True)
class Ref:
    """A parsed ``dataset@ref``; ``ref`` is ``latest`` when none was given."""

    dataset: str
    ref: str = LATEST

    def __str__(self) -> str:
        return f"{self.dataset}@{self.ref}"

    @property
    def could_be_commit(self) -> bool:
        """True if ``ref`` is shaped like a commit-id prefix (4 to 64 lowercase hex digits)."""
        return bool(_COMMIT_PREFIX.fullmatch(self.ref))

    @property
    def is_full_id(self) -> bool:
        """True if ``ref`` is a whole commit id (64 hex digits): it names one commit forever,
        so it is answered from a site root alone, with no catalog or lake."""
        return len(self.ref) == 64 and self.could_be_commit

    def at(self, commit_id: str) -> Ref:
        """The same dataset, pinned to ``commit_id``."""
        return Ref(self.dataset, commit_id)

    @classmethod
    def of(cls, value: str | Ref) -> Ref:
        """``value`` parsed, or itself when it is already a Ref: refs are parsed once."""
        return value if isinstance(value, Ref) else parse_ref(value)


def validate_dataset_name(name: str) -> str:
    """Return ``name`` if it is a valid dataset name, else raise InvalidRefError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.endswith("."):
        raise InvalidRefError(
            f"invalid dataset name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter, digit or '_'",
            value=name,
        )
    return name


def validate_tag_name(tag: str) -> str:
    """Return ``tag`` if it can be created as a tag, else raise InvalidRefError."""
    if not isinstance(tag, str) or not _NAME.fullmatch(tag) or tag.endswith("."):
        raise InvalidRefError(
            f"invalid tag name {tag!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter, digit or '_'",
            value=tag,
        )
    if tag in RESERVED_TAGS:
        raise InvalidRefError(f"'{tag}' is reserved (it always means the newest commit); pick another tag name", value=tag)
    if _COMMIT_PREFIX.fullmatch(tag) and len(tag) >= 8:
        raise InvalidRefError(
            f"tag {tag!r} looks like a commit id and would shadow one; pick a name that is not all hex",
            value=tag,
        )
    return tag


def parse_ref(text: str) -> Ref:
    """Parse ``name``, ``name@tag``, ``name@latest`` or ``name@<commit-id prefix>``."""
    if not isinstance(text, str) or not text:
        raise InvalidRefError("empty dataset reference: expected NAME or NAME@REF, e.g. chest-xray@v3", value=text)
    if text.count("@") > 1:
        raise InvalidRefError(f"malformed reference {text!r}: expected NAME@REF with a single '@'", value=text)
    name, _, ref = text.partition("@")
    if "@" in text and not ref:
        raise InvalidRefError(f"malformed reference {text!r}: nothing after '@' (try {name}@latest)", value=text)
    try:
        validate_dataset_name(name)
    except InvalidRefError as exc:
        raise InvalidRefError(f"malformed reference {text!r}: {exc.message}", value=text) from None
    ref = ref or LATEST
    if not _NAME.fullmatch(ref) or ref.endswith("."):
        raise InvalidRefError(
            f"malformed reference {text!r}: the part after '@' must be a tag, 'latest' or a commit-id prefix",
            value=text,
        )
    return Ref(name, ref)
