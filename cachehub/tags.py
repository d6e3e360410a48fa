"""Moving a tag: compare-and-swap in the lake, then the catalog and the audit trail."""

from __future__ import annotations

from .context import Context
from .errors import ConflictError, FormatError
from .model import Commit, Tag
from .refs import validate_tag_name


def tag(ctx: Context, commit: Commit, name: str, *, force: bool = False) -> Tag:
    """Point tag ``name`` of ``commit``'s dataset at it, by compare-and-swap in the lake.

    An existing tag elsewhere is moved only with ``force``; a tag moved by someone else between
    our read and our write is never overwritten (ConflictError, nothing changed).
    """
    validate_tag_name(name)
    lake = ctx.lake
    try:
        current = lake.read_tag(commit.dataset, name)
    except FormatError:
        if not force:
            raise
        current = ("", lake.tag_etag(commit.dataset, name))  # damaged: replaced, by CAS on what is there
    result = Tag(commit.dataset, name, commit.id)
    if current is not None and current[0] == commit.id:
        ctx.catalog.set_tag(result, current[1])
        return result
    if current is not None and not force:
        raise ConflictError(
            f"tag {commit.dataset}@{name} already points at {current[0][:12]}; pass --force to move it",
            dataset=commit.dataset,
            tag=name,
        )
    expect: str | bool = current[1] if current is not None else False
    try:
        etag = lake.write_tag(commit.dataset, name, commit.id, author=ctx.user, expect=expect)
    except ConflictError:
        raise ConflictError(
            f"tag {commit.dataset}@{name} was moved by someone else at the same moment; nothing changed. "
            f"Check with: cachehub show {commit.dataset}@{name}",
            dataset=commit.dataset,
            tag=name,
        ) from None
    with ctx.catalog.transaction():
        ctx.catalog.set_tag(result, etag)
        ctx.events.audit(
            "tag",
            dataset=commit.dataset,
            commit=commit.id,
            ref=name,
            previous=current[0] if current else None,
            forced=bool(force and current),
        )
    return result
