"""Publishing commits, against both backends: local directory and a real S3 server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cachehub.api import Hub
from cachehub.errors import (
    AmbiguousRefError,
    ConflictError,
    DatasetNotFoundError,
    InvalidRefError,
    RefNotFoundError,
    UnsafePathError,
)
from cachehub.lake import commit_key, object_key
from cachehub.manifest import read_manifest

from .conftest import random_tree, write_tree


def lake_keys(hub: Hub, prefix: str) -> set[str]:
    return set(hub.lake.backend.list(prefix))


def test_push_creates_commit_and_uploads_content_once(hub: Hub, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"a/1.txt": "one", "a/2.txt": "two", "b/dup.txt": "one", "top": "t"})
    r = hub.push(src, "ds", message="first", tag="v1")
    assert r.created and r.files == 4 and r.bytes == 10
    assert r.uploaded_files == 3  # "one" is stored once
    assert r.present_files == 1
    commit = hub.show("ds@v1")
    assert commit.id == r.commit and commit.tags == ("v1",) and commit.parents == ()
    assert [e.path for e in hub.ls("ds@v1")] == ["a/1.txt", "a/2.txt", "b/dup.txt", "top"]
    assert [e.path for e in hub.ls("ds@v1", "a")] == ["a/1.txt", "a/2.txt"]
    assert len(lake_keys(hub, "objects")) == 3


def test_identical_push_creates_nothing_and_says_so(hub: Hub, tmp_path: Path) -> None:
    src = random_tree(tmp_path / "src", 30)
    first = hub.push(src, "ds")
    before = lake_keys(hub, "")
    again = hub.push(src, "ds")
    assert not again.created and again.commit == first.commit
    assert again.uploaded_files == 0 and again.uploaded_bytes == 0
    assert lake_keys(hub, "") == before
    assert len(hub.log("ds")) == 1


def test_content_already_in_the_lake_is_not_stored_again(hub: Hub, tmp_path: Path) -> None:
    """Another dataset with the same bytes: every create-only PUT finds the object there."""
    src = random_tree(tmp_path / "src", 25)
    first = hub.push(src, "one")
    objects = lake_keys(hub, "objects")
    other = hub.push(src, "two")
    assert other.created and other.commit != first.commit
    assert other.uploaded_files == 0 and other.uploaded_bytes == 0 and other.present_files == 25
    assert lake_keys(hub, "objects") == objects


def test_second_version_uploads_only_the_delta_and_records_parent(hub: Hub, tmp_path: Path) -> None:
    src = random_tree(tmp_path / "src", 40)
    v1 = hub.push(src, "ds", tag="v1")
    (src / "class0/img0000.bin").write_bytes(b"changed")
    (src / "class1/img0001.bin").unlink()
    (src / "new.bin").write_bytes(b"brand new")
    v2 = hub.push(src, "ds", tag="v2", message="second")
    assert v2.uploaded_files == 2 and v2.uploaded_bytes == len(b"changed") + len(b"brand new")
    assert hub.show("ds@v2").parents == (v1.commit,)
    log = hub.log("ds")
    assert [c.id for c in log] == [v2.commit, v1.commit]
    changes = {(d.path, d.change) for d in hub.diff("ds@v1", "ds@v2")}
    assert changes == {("class0/img0000.bin", "modified"), ("class1/img0001.bin", "removed"), ("new.bin", "added")}
    assert hub.resolve_commit("ds").id == v2.commit == hub.resolve_commit("ds@latest").id


def test_commit_id_is_the_hash_of_its_document(hub: Hub, tmp_path: Path) -> None:
    import hashlib

    r = hub.push(write_tree(tmp_path / "s", {"x": "1"}), "ds")
    data, _ = hub.lake.backend.read(commit_key("ds", r.commit))
    assert hashlib.sha256(data).hexdigest() == r.commit
    body = json.loads(data)
    assert body["format"] == "cachehub-commit" and body["format_version"] == 1
    # every object the manifest names is in the lake, addressed by the hash of its bytes
    for entry in hub.manifest(hub.resolve_commit(f"ds@{r.commit}")):
        blob, _ = hub.lake.backend.read(object_key(entry.sha256))
        assert hashlib.sha256(blob).hexdigest() == entry.sha256


def test_ref_errors_are_distinct(hub: Hub, tmp_path: Path) -> None:
    hub.push(write_tree(tmp_path / "s", {"x": "1"}), "ds", tag="v1")
    with pytest.raises(DatasetNotFoundError):
        hub.resolve_commit("nope@v1")
    with pytest.raises(RefNotFoundError):
        hub.resolve_commit("ds@v9")
    with pytest.raises(InvalidRefError):
        hub.resolve_commit("ds@@v1")


def test_ambiguous_commit_prefix(hub: Hub, tmp_path: Path) -> None:
    """Two real commits whose ids share 4 hex digits: found by varying the message offline."""
    import hashlib

    from cachehub.lake import canonical_json, commit_body

    base = hub.show(f"ds@{hub.push(write_tree(tmp_path / 's', {'x': '1'}), 'ds').commit}")
    seen: dict[str, dict] = {}
    for i in range(100_000):
        body = commit_body(base) | {"message": f"variant {i}", "parents": [base.id]}
        prefix = hashlib.sha256(canonical_json(body)).hexdigest()[:4]
        if prefix in seen:
            first = hub.lake.write_commit(seen[prefix])
            second = hub.lake.write_commit(body)
            break
        seen[prefix] = body
    assert first.id[:4] == second.id[:4] and first.id != second.id
    with pytest.raises(AmbiguousRefError, match="more characters"):
        hub.resolve_commit(f"ds@{prefix}")
    common = os.path.commonprefix([first.id, second.id])
    assert hub.resolve_commit(f"ds@{first.id[: len(common) + 1]}").id == first.id


def test_tag_compare_and_swap(hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "s"
    write_tree(src, {"x": "1"})
    a = hub.push(src, "ds").commit
    write_tree(src, {"x": "2"})
    b = hub.push(src, "ds").commit
    hub.tag(f"ds@{a}", "prod")
    with pytest.raises(ConflictError, match="--force"):
        hub.tag(f"ds@{b}", "prod")
    assert hub.resolve_commit("ds@prod").id == a
    hub.tag(f"ds@{b}", "prod", force=True)
    assert hub.resolve_commit("ds@prod").id == b
    assert hub.lake.read_tag("ds", "prod")[0] == b
    # a stale etag loses: somebody moved the tag since we read it
    _, etag = hub.lake.read_tag("ds", "prod")
    hub.lake.write_tag("ds", "prod", a, author="other", expect=etag)
    with pytest.raises(ConflictError):
        hub.lake.write_tag("ds", "prod", b, author="me", expect=etag)
    assert hub.lake.read_tag("ds", "prod")[0] == a


def test_push_with_existing_tag_fails_before_uploading(hub: Hub, tmp_path: Path) -> None:
    hub.push(write_tree(tmp_path / "a", {"x": "1"}), "ds", tag="v1")
    before = lake_keys(hub, "objects")
    with pytest.raises(ConflictError):
        hub.push(write_tree(tmp_path / "b", {"y": "2"}), "ds", tag="v1")
    assert lake_keys(hub, "objects") == before
    assert len(hub.log("ds")) == 1


@pytest.mark.parametrize("kind", ["outside", "dangling", "dir"])
def test_unsafe_symlinks_are_refused_and_change_nothing(hub: Hub, tmp_path: Path, kind: str) -> None:
    src = write_tree(tmp_path / "src", {"ok.txt": "fine"})
    (tmp_path / "secret").write_text("do not publish")
    if kind == "outside":
        os.symlink(tmp_path / "secret", src / "link")
    elif kind == "dangling":
        os.symlink(src / "missing", src / "link")
    else:
        (src / "d").mkdir()
        os.symlink(src / "d", src / "link")
    with pytest.raises(UnsafePathError, match="link"):
        hub.push(src, "ds")
    assert lake_keys(hub, "objects") == set()
    assert hub.lake.commit_ids("ds") == []


def test_symlink_to_file_inside_is_stored_as_a_file(hub: Hub, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "src", {"real.txt": "content"})
    os.symlink("real.txt", src / "alias.txt")
    r = hub.push(src, "ds")
    entries = {e.path: e for e in hub.ls(f"ds@{r.commit}")}
    assert entries["alias.txt"].sha256 == entries["real.txt"].sha256 and entries["alias.txt"].size == 7


def test_invalid_dataset_name_is_refused(hub: Hub, tmp_path: Path) -> None:
    with pytest.raises(InvalidRefError):
        hub.push(write_tree(tmp_path / "s", {"x": "1"}), "../evil")


def test_manifest_order_is_bytewise(hub: Hub, tmp_path: Path) -> None:
    src = write_tree(tmp_path / "s", {"a.txt": "1", "a/b": "2", "a-b": "3", "ab": "4", "é": "5", "Z": "6"})
    r = hub.push(src, "ds")
    paths = [e.path for e in read_manifest(hub.manifest_path(hub.show(f"ds@{r.commit}").manifest))]
    assert paths == sorted(paths, key=str.encode)
    assert set(paths) == {"a.txt", "a/b", "a-b", "ab", "é", "Z"}


def test_audit_records_push_and_tag(hub: Hub, tmp_path: Path) -> None:
    r = hub.push(write_tree(tmp_path / "s", {"x": "1"}), "ds", tag="v1")
    events = list(hub.catalog.audit_events(dataset="ds"))
    actions = [e["action"] for e in events]
    assert actions == ["push", "tag"]
    assert all(e["user"] and e["host"] and e["time"] for e in events)
    assert events[0]["commit"] == r.commit and events[1]["ref"] == "v1"


def test_catalog_rebuild_from_the_lake_alone(hub: Hub, tmp_path: Path, settings) -> None:  # type: ignore[no-untyped-def]
    src = random_tree(tmp_path / "src", 10)
    hub.push(src, "ds", tag="v1")
    (src / "extra").write_text("x")
    hub.push(src, "ds", tag="v2")
    hub.push(write_tree(tmp_path / "o", {"y": "1"}), "other")
    before = ([c.id for c in hub.log("ds")], [(d.name, d.commits, d.tags) for d in hub.datasets()])
    hub.close()
    settings.catalog_path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(str(settings.catalog_path) + suffix).unlink(missing_ok=True)
    with Hub(settings) as fresh:
        counts = fresh.rebuild_catalog()
        assert counts["datasets"] == 2 and counts["commits"] == 3 and counts["tags"] == 2
        after = ([c.id for c in fresh.log("ds")], [(d.name, d.commits, d.tags) for d in fresh.datasets()])
        assert after == before
        assert fresh.resolve_commit("ds@v1").files == 10


def test_hash_cache_survives_flushes_in_the_middle_of_a_walk(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are flushed every BATCH files while the walk reads the cache through one cursor."""
    from cachehub import hashcache

    monkeypatch.setattr(hashcache, "BATCH", 3)
    src = random_tree(tmp_path / "src", 20)
    assert hub.push(src, "ds").hashed_files == 20
    again = hub.push(src, "ds")
    assert again.hashed_files == 0 and not again.created
    (src / "class1/img0007.bin").write_bytes(b"changed")
    third = hub.push(src, "ds")
    assert third.hashed_files == 1 and third.uploaded_files == 1
