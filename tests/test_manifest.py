"""Manifest round trip and diff: properties against a naive dict model (Hypothesis)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cachehub.diff import diff, diff_files, stat
from cachehub.errors import FormatError, UnsafePathError
from cachehub.manifest import manifest_id_of_file, read_manifest, validate_manifest_file, write_manifest
from cachehub.model import ManifestEntry

path_st = st.lists(
    st.text(alphabet="abcé/_-.Z09", min_size=1, max_size=8), min_size=1, max_size=3
).map("/".join).filter(lambda p: all(s not in ("", ".", "..") for s in p.split("/")))
digest_st = st.sampled_from([hashlib.sha256(bytes([i])).hexdigest() for i in range(6)])

def _a_tree(paths: dict[str, object]) -> bool:
    """A real directory tree: no file lies inside another file (``d`` and ``d/x``)."""
    return not any(p.rpartition("/")[0] and any(p.startswith(q + "/") for q in paths) for p in paths)


tree_st = st.dictionaries(path_st, st.tuples(st.integers(0, 10**12), digest_st), max_size=40).filter(_a_tree)


def entries(tree: dict[str, tuple[int, str]]) -> list[ManifestEntry]:
    return [ManifestEntry(p, s, d) for p, (s, d) in sorted(tree.items(), key=lambda kv: kv[0].encode())]


def test_a_file_inside_a_file_is_refused(tmp_path: Path) -> None:
    d = hashlib.sha256(b"x").hexdigest()
    path = tmp_path / "m.tsv.gz"
    write_manifest(path, [ManifestEntry("d", 1, d), ManifestEntry("d-1", 1, d), ManifestEntry("d/x", 1, d)])
    with pytest.raises(UnsafePathError, match="lies inside 'd', which is a file"):
        validate_manifest_file(path)  # as a manifest from the lake is, on arrival


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=60)
@given(tree_st)
def test_round_trip(tmp_path: Path, tree: dict[str, tuple[int, str]]) -> None:
    path = tmp_path / "m.tsv.gz"
    mid, files, nbytes = write_manifest(path, entries(tree))
    assert list(read_manifest(path)) == entries(tree)
    assert (files, nbytes) == (len(tree), sum(s for s, _ in tree.values()))
    assert manifest_id_of_file(path) == mid
    # the id does not depend on compression
    raw = gzip.decompress(path.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == mid


@given(tree_st, tree_st)
def test_diff_matches_naive_model(old: dict[str, tuple[int, str]], new: dict[str, tuple[int, str]]) -> None:
    got = {(d.path, d.change, d.old_size, d.new_size) for d in diff(entries(old), entries(new))}
    want = set()
    for p in old.keys() - new.keys():
        want.add((p, "removed", old[p][0], None))
    for p in new.keys() - old.keys():
        want.add((p, "added", None, new[p][0]))
    for p in old.keys() & new.keys():
        if old[p] != new[p]:
            want.add((p, "modified", old[p][0], new[p][0]))
    assert got == want
    ordered = [d.path for d in diff(entries(old), entries(new))]
    assert ordered == sorted(ordered, key=str.encode)
    s = stat(diff(entries(old), entries(new)))
    assert s.added + s.removed + s.modified == len(want)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=80)
@given(tree_st, tree_st)
def test_diff_files_equals_the_entry_merge(tmp_path: Path, old: dict[str, tuple[int, str]], new: dict[str, tuple[int, str]]) -> None:
    """The raw-line merge over files gives exactly what the parsed merge gives, in order."""
    write_manifest(tmp_path / "old.tsv.gz", entries(old))
    write_manifest(tmp_path / "new.tsv.gz", entries(new))
    assert list(diff_files(tmp_path / "old.tsv.gz", tmp_path / "new.tsv.gz")) == list(diff(entries(old), entries(new)))


def test_writer_refuses_out_of_order_and_duplicates(tmp_path: Path) -> None:
    h = hashlib.sha256(b"").hexdigest()
    with pytest.raises(ValueError):
        write_manifest(tmp_path / "a", [ManifestEntry("b", 0, h), ManifestEntry("a", 0, h)])
    with pytest.raises(UnsafePathError):
        write_manifest(tmp_path / "b", [ManifestEntry("a", 0, h), ManifestEntry("a", 0, h)])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _raw_manifest(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "raw.tsv.gz"
    p.write_bytes(gzip.compress(body.encode()))
    return p


@pytest.mark.parametrize("bad", ["../evil", "/etc/passwd", "a/../../b", "ok/\x00x"])
def test_reader_refuses_hostile_paths(tmp_path: Path, bad: str) -> None:
    h = hashlib.sha256(b"").hexdigest()
    p = _raw_manifest(tmp_path, f"#cachehub-manifest format_version=1\n{h}\t0\t{bad}\n")
    with pytest.raises(UnsafePathError):
        list(read_manifest(p))


def test_reader_refuses_unknown_version_and_garbage(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="upgrade cachehub"):
        list(read_manifest(_raw_manifest(tmp_path, "#cachehub-manifest format_version=99\n")))
    with pytest.raises(FormatError):
        list(read_manifest(_raw_manifest(tmp_path, "hello\n")))
    h = hashlib.sha256(b"").hexdigest()
    with pytest.raises(FormatError, match="sorted"):
        list(read_manifest(_raw_manifest(tmp_path, f"#cachehub-manifest format_version=1\n{h}\t0\tb\n{h}\t0\ta\n")))


def test_diff_streams_large_manifests_in_bounded_memory(tmp_path: Path) -> None:
    """100k entries each side: diff consumes iterators (nothing is materialised)."""
    import tracemalloc

    h1, h2 = hashlib.sha256(b"1").hexdigest(), hashlib.sha256(b"2").hexdigest()
    n = 100_000
    paths = [f"d{i % 7}/f{i:07d}" for i in range(n)]
    paths.sort(key=str.encode)
    write_manifest(tmp_path / "a", (ManifestEntry(p, 1, h1) for p in paths))
    write_manifest(tmp_path / "b", (ManifestEntry(p, 1, h2 if i % 1000 == 0 else h1) for i, p in enumerate(paths)))
    del paths
    for name, run in (
        ("diff", lambda: diff(read_manifest(tmp_path / "a"), read_manifest(tmp_path / "b"))),
        ("diff_files", lambda: diff_files(tmp_path / "a", tmp_path / "b")),
    ):
        tracemalloc.start()
        changed = sum(1 for _ in run())
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert changed == n // 1000
        # a list of the entries would be >15 MB; diff_files holds one ~1 MiB block of lines per side
        assert peak < 16 * 1024 * 1024, f"{name} peaked at {peak} bytes"
