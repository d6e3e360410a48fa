"""Ref parsing and manifest-path validation: examples and properties (Hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cachehub.errors import InvalidRefError, UnsafePathError
from cachehub.paths import validate_path
from cachehub.refs import Ref, parse_ref, validate_tag_name

NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,40}", fullmatch=True).filter(lambda s: not s.endswith("."))


@given(names, names)
def test_name_at_ref_round_trips(name: str, ref: str) -> None:
    parsed = parse_ref(f"{name}@{ref}")
    assert parsed == Ref(name, ref)
    assert parse_ref(str(parsed)) == parsed


@given(names)
def test_plain_name_means_latest(name: str) -> None:
    assert parse_ref(name) == Ref(name, "latest")


@given(st.text(max_size=60))
def test_parse_ref_accepts_or_raises_invalid_ref_only(text: str) -> None:
    try:
        parsed = parse_ref(text)
    except InvalidRefError:
        return
    assert "@" not in parsed.dataset and "/" not in parsed.dataset and "/" not in parsed.ref
    assert text in (parsed.dataset, f"{parsed.dataset}@{parsed.ref}")


@pytest.mark.parametrize(
    "text", ["", "@v1", "a@", "a@@b", "a@b@c", "../x", "a/b@v1", "a@v/1", ".hidden", "-x", "a b", "x@.", "x@v1."]
)
def test_malformed_refs_are_refused(text: str) -> None:
    with pytest.raises(InvalidRefError):
        parse_ref(text)


def test_commit_prefix_shape() -> None:
    assert parse_ref("x@abcd1234").could_be_commit
    assert not parse_ref("x@v3").could_be_commit


@pytest.mark.parametrize("tag", ["latest", "deadbeef", "0123456789abcdef", "", "a/b", "v1."])
def test_unusable_tag_names(tag: str) -> None:
    with pytest.raises(InvalidRefError):
        validate_tag_name(tag)


segments = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"), min_size=1, max_size=20
).filter(lambda s: s not in (".", ".."))


@given(st.lists(segments, min_size=1, max_size=6))
def test_plain_relative_paths_are_accepted(parts: list[str]) -> None:
    path = "/".join(parts)
    if len(path.encode()) > 4096 or any(len(p.encode()) > 255 for p in parts):
        return
    if len(path) >= 2 and path[1] == ":" and path[0].isalpha():
        return
    assert validate_path(path) == path


@given(st.lists(segments, max_size=4), st.sampled_from(["..", ".", ""]), st.lists(segments, max_size=4))
def test_paths_with_dot_segments_are_refused(before: list[str], bad: str, after: list[str]) -> None:
    path = "/".join([*before, bad, *after])
    with pytest.raises(UnsafePathError):
        validate_path(path)


@given(st.text(min_size=1, max_size=40))
def test_validated_paths_never_escape(path: str) -> None:
    import posixpath

    try:
        validate_path(path)
    except UnsafePathError:
        return
    joined = posixpath.normpath(posixpath.join("/root/site", path))
    assert joined.startswith("/root/site/")
    assert "\x00" not in path and not path.startswith("/")


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a\x00b", "a\\b", "a/\nb", "C:/x", "a/", ""]
)
def test_hostile_paths_are_refused(path: str) -> None:
    with pytest.raises(UnsafePathError):
        validate_path(path)
