"""The ``cachehub://`` fsspec filesystem, partial caches, and real loaders over both.

Every test runs against a local lake and against SeaweedFS (``lake_kind``), unless it says why
not; sites are real directories. Damage is made by rewriting the lake's object through the
backend (bit rot in the lake), never by mocking a read.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path

import fsspec
import pytest

from cachehub import ConflictError, Hub, IntegrityError, NotCachedError
from cachehub.fs import CachehubFileSystem
from cachehub.lake import chunk_map_key, object_key
from cachehub.select import Selection

from .conftest import BUCKET, SeaweedServer, run_cli, tree_digest, write_tree

MiB = 1024 * 1024


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rng = random.Random(11)
    files: dict[str, bytes | str] = {f"train/img{i:03d}.bin": rng.randbytes(rng.randint(100, 4000)) for i in range(30)}
    files.update({f"val/img{i:03d}.bin": rng.randbytes(500) for i in range(5)})
    files["val/scratch.tmp"] = "temporary"
    files["shards/big.bin"] = rng.randbytes(20 * MiB + 777)  # a large object: chunk map, ranged reads
    files["README.md"] = "# scans\n"
    return write_tree(tmp_path / "src", files)


@pytest.fixture
def pushed(hub: Hub, data: Path) -> Hub:
    hub.push(data, "scans", tag="v1")
    return hub


def _fs(hub: Hub, **options: object) -> CachehubFileSystem:
    return CachehubFileSystem(context=hub.ctx, skip_instance_cache=True, **options)


def _uses(hub: Hub) -> int:
    return len(list(hub.catalog.audit_events(action="use")))


def _sha(hub: Hub, path: str) -> str:
    return next(e.sha256 for e in hub.ls("scans@v1") if e.path == path)


# -- the filesystem ----------------------------------------------------------------------------
def test_registered_through_the_fsspec_entry_point(pushed: Hub, data: Path) -> None:
    assert fsspec.get_filesystem_class("cachehub") is CachehubFileSystem
    with fsspec.open("cachehub://scans@v1/README.md", "rt") as fh:  # options from the environment
        assert fh.read() == "# scans\n"


def test_listing_comes_from_the_manifest(pushed: Hub, data: Path) -> None:
    fs = _fs(pushed)
    assert fs.ls("scans@v1", detail=False) == ["scans@v1/README.md", "scans@v1/shards", "scans@v1/train", "scans@v1/val"]
    assert fs.ls("", detail=False) == ["scans"]
    info = fs.info("cachehub://scans@v1/shards/big.bin")
    assert info["type"] == "file" and info["size"] == (data / "shards/big.bin").stat().st_size and len(info["sha256"]) == 64
    assert fs.info("scans@v1/train")["type"] == "directory" and fs.isdir("scans@v1/val")
    assert len(fs.find("scans@v1/train")) == 30
    assert fs.glob("scans@v1/**/*.tmp") == ["scans@v1/val/scratch.tmp"]
    assert fs.glob("cachehub://scans/val/img00[0-1].bin") == ["scans/val/img000.bin", "scans/val/img001.bin"]  # NAME: latest
    walked = {root: sorted(files) for root, _dirs, files in fs.walk("scans@v1")}
    assert walked["scans@v1/val"] == ["img000.bin", "img001.bin", "img002.bin", "img003.bin", "img004.bin", "scratch.tmp"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        fs.info("scans@v1/nope.txt")
    with pytest.raises(PermissionError, match="read-only"):
        fs.open("scans@v1/new.txt", "wb")


def test_uncached_reads_come_from_the_lake_verified(pushed: Hub, data: Path) -> None:
    fs = _fs(pushed)
    assert not pushed.status()[0].commits  # nothing cached: every byte below comes from the lake
    assert fs.cat("scans@v1/train/img007.bin") == (data / "train/img007.bin").read_bytes()
    big = (data / "shards/big.bin").read_bytes()
    assert fs.cat("scans@v1/shards/big.bin") == big  # whole: parallel ranged GETs, checked against its SHA-256
    for start, end in [(0, 10), (5 * MiB - 3, 5 * MiB + 9), (len(big) - 100, len(big)), (MiB, 4 * MiB), (MiB + 5, 19 * MiB)]:
        assert fs.cat_file("scans@v1/shards/big.bin", start, end) == big[start:end]
    got = fs.cat("scans@v1/train/*.bin")
    assert len(got) == 30 and all(v == (data / k.split("/", 1)[1]).read_bytes() for k, v in got.items())
    assert not any(Path(pushed.settings.site(pushed.settings.default_site).root, "objects").rglob("*"))  # no write-through by default


def test_ranges_of_a_large_file_match(pushed: Hub, data: Path) -> None:
    big = (data / "shards/big.bin").read_bytes()
    rng = random.Random(5)
    with _fs(pushed).open("scans@v1/shards/big.bin", block_size=MiB) as fh:
        for _ in range(25):
            start, length = rng.randrange(len(big)), rng.randint(1, 2 * MiB)
            fh.seek(start)
            assert fh.read(length) == big[start : start + length]


def test_a_damaged_object_is_never_returned(pushed: Hub, data: Path) -> None:
    small_sha = _sha(pushed, "train/img003.bin")
    original = (data / "train/img003.bin").read_bytes()
    pushed.lake.backend.write(object_key(small_sha), original[:-1] + bytes([original[-1] ^ 1]))
    big = (data / "shards/big.bin").read_bytes()
    big_sha = _sha(pushed, "shards/big.bin")
    pushed.lake.backend.write(object_key(big_sha), big[: 10 * MiB] + b"\x00" * 8 + big[10 * MiB + 8 :])
    fs = _fs(pushed)
    with pytest.raises(IntegrityError, match="does not match its SHA-256"):
        fs.cat("scans@v1/train/img003.bin")
    with pytest.raises(IntegrityError, match="SHA-256"), fs.open("scans@v1/train/img003.bin") as fh:
        fh.read(1)  # not even one byte of it
    assert fs.cat_file("scans@v1/shards/big.bin", 0, MiB) == big[:MiB]  # undamaged chunks still read
    with pytest.raises(IntegrityError, match="do not match its chunk map"):
        fs.cat_file("scans@v1/shards/big.bin", 10 * MiB, 10 * MiB + 4)


def test_a_cached_commit_is_read_from_the_site(pushed: Hub, data: Path) -> None:
    pushed.cache("scans@v1")
    for entry in pushed.ls("scans@v1"):  # the lake loses everything: the site must answer
        pushed.lake.backend.write(object_key(entry.sha256), b"gone")
    fs = _fs(pushed)
    assert fs.cat("scans@v1/shards/big.bin") == (data / "shards/big.bin").read_bytes()
    assert fsspec.filesystem("file").cat_file(str(data / "README.md")) == fs.cat("scans@v1/README.md")


def test_write_through_stores_what_was_read_at_the_site(pushed: Hub, data: Path) -> None:
    fs = _fs(pushed, write_through=True)
    fs.cat(["scans@v1/val/img000.bin", "scans@v1/val/img001.bin"])
    sha = _sha(pushed, "val/img000.bin")
    store = pushed.ctx.store()
    assert os.path.exists(store.object_file(sha))
    pushed.lake.backend.write(object_key(sha), b"lost in the lake")  # the next reader at the site needs no lake
    assert _fs(pushed).cat("scans@v1/val/img000.bin") == (data / "val/img000.bin").read_bytes()


def test_a_large_object_without_a_chunk_map_is_fetched_whole_and_verified(pushed: Hub, data: Path) -> None:
    big_sha = _sha(pushed, "shards/big.bin")
    pushed.lake.backend.delete(chunk_map_key(big_sha))  # pushed by an older cachehub
    big = (data / "shards/big.bin").read_bytes()
    assert _fs(pushed).cat_file("scans@v1/shards/big.bin", 100, 200) == big[100:200]
    assert os.path.exists(pushed.ctx.store().object_file(big_sha))  # verified, then read at the site


def test_one_use_per_filesystem_and_ref(pushed: Hub) -> None:
    before = _uses(pushed)
    fs = _fs(pushed)
    for i in range(10):
        fs.cat(f"scans@v1/train/img{i:03d}.bin")
    fs.ls("scans@v1/val")
    assert _uses(pushed) == before + 1
    fs.cat("scans/README.md")  # another ref (latest): its own use
    assert _uses(pushed) == before + 2
    _fs(pushed).cat("scans@v1/README.md")  # another instance
    assert _uses(pushed) == before + 3
    [event] = list(pushed.catalog.audit_events(action="use"))[-1:]
    assert event["details"]["via"] == "fsspec"


def test_s3fs_style_storage_options_reach_the_lake(seaweed: SeaweedServer, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An S3 lake whose endpoint and keys come only from storage_options, as with s3fs."""
    from cachehub.config import load_settings

    monkeypatch.setenv("CACHEHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CACHEHUB_LAKE", f"s3://{BUCKET}/{uuid.uuid4().hex}")
    monkeypatch.setenv("CACHEHUB_ENDPOINT_URL", seaweed.endpoint)
    with Hub(load_settings()) as hub:
        hub.push(data, "scans", tag="v1")
    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    for var in ("CACHEHUB_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    options = {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": seaweed.endpoint}, "use_listings_cache": False}
    with fsspec.open("cachehub://scans@v1/README.md", "rb", **options) as fh:
        assert fh.read() == b"# scans\n"
    fs = fsspec.filesystem("cachehub", **options)
    assert secret not in repr(fs.ctx.settings)  # credentials are never shown
    assert secret not in (tmp_path / "home" / "catalog.db").read_bytes().decode("latin-1")


# -- partial caches ----------------------------------------------------------------------------
def test_selection_patterns() -> None:
    s = Selection.of(["train/**", "README.md"], "*.tmp")
    assert s.matches("train/a/b.png") and s.matches("README.md")
    assert not s.matches("val/a.png") and not s.matches("train/x.tmp")
    assert s.matches("docs/README.md")  # no "/" in the pattern: that name in any folder, as in .gitignore
    assert not Selection.of("/README.md".lstrip("/") + "/").matches("x") and Selection.of("docs/README.md").matches("docs/README.md")
    assert Selection.of("**/*.png").matches("a/b/c.png") and Selection.of("**/*.png").matches("c.png")
    assert Selection.of("*.png").matches("deep/down/c.png")  # no "/": the name, in any folder
    assert Selection.of("train").matches("train/a.png")  # a folder brings what is below it
    assert Selection.of("img?.bin").matches("img1.bin") and not Selection.of("img?.bin").matches("img10.bin")
    assert not Selection() and Selection().matches("anything") and Selection().entry_id("c" * 64) == "c" * 64
    assert Selection.of("a").entry_id("c" * 64) != Selection.of("b").entry_id("c" * 64)
    for bad in ("", "/abs/**", "../up", "a/../../b"):
        with pytest.raises(Exception, match="bad file pattern"):
            Selection.of(bad)


def test_partial_cache_is_an_entry_of_its_own(pushed: Hub, data: Path, env: dict[str, str]) -> None:
    r = pushed.cache("scans@v1", include="train/**", exclude="img00*.bin")
    assert r.entry != r.commit and r.entry.startswith(r.commit + "-")
    tree = Path(r.path)
    expected = {f"train/img{i:03d}.bin" for i in range(10, 30)}
    assert set(tree_digest(tree)) == expected
    assert r.files == 20 and r.fetched_files == 20
    assert tree_digest(tree) == {k: v for k, v in tree_digest(data).items() if k in expected}
    # resolve and use name it by the same patterns; the whole commit is not cached
    assert pushed.resolve("scans@v1", include="train/**", exclude="img00*.bin") == tree
    with pytest.raises(NotCachedError, match="--include 'train/\\*\\*'"):
        pushed.resolve("scans@v1", include="train/**")
    with pytest.raises(NotCachedError):
        pushed.resolve("scans@v1")
    with pushed.use("scans@v1", include="train/**", exclude="img00*.bin") as leased:
        assert leased == tree
        assert [lease.commit for lease in pushed.leases()] == [r.entry]
        with pytest.raises(ConflictError, match="leased"):  # refused like any leased entry
            pushed.evict(["scans@v1"], now=10**12)
    [row] = pushed.status()[0].commits
    assert row.commit == r.entry and row.of_commit == r.commit and row.selection == {"include": ["train/**"], "exclude": ["img00*.bin"]}
    assert pushed.verify("scans@v1", include="train/**", exclude="img00*.bin").ok
    # the CLI: the same entry, exit 3 with the command to run when another selection is asked
    out = run_cli("path", "scans@v1", "--include", "train/**", "--exclude", "img00*.bin", env=env, check=True)
    assert out.stdout.strip() == str(tree)
    miss = run_cli("path", "scans@v1", "--include", "val/**", env=env)
    assert miss.returncode == 3 and "cachehub cache scans@v1" in miss.stderr and "--include 'val/**'" in miss.stderr
    assert "partial: include train/**; exclude img00*.bin" in run_cli("status", env=env, check=True).stdout


def test_a_later_full_cache_reuses_the_partial_objects(pushed: Hub, data: Path) -> None:
    part = pushed.cache("scans@v1", include="val/**", exclude="*.tmp")
    assert part.fetched_files == 5
    whole = pushed.cache("scans@v1")
    assert whole.reused_files == 5 and whole.fetched_files == whole.files - 5
    assert tree_digest(Path(whole.path)) == tree_digest(data)
    assert pushed.resolve("scans@v1", include="train/**") == Path(whole.path)  # the whole tree serves any selection
    assert pushed.resolve("scans@v1", include="val/**", exclude="*.tmp") == Path(part.path)  # its own entry still does
    plan, result = pushed.evict(["scans@v1"], now=10**12)
    assert {e.entry.commit for e in plan.evict} == {part.entry, whole.commit}  # a ref names every entry of its commit
    assert result is not None and not pushed.status()[0].commits


def test_repair_of_a_partial_tree_restores_only_its_files(pushed: Hub, data: Path) -> None:
    from cachehub import verify

    r = pushed.cache("scans@v1", include="val/*.bin")
    victim = Path(r.path) / "val/img002.bin"
    os.chmod(victim.parent, 0o755)
    victim.unlink()
    os.chmod(victim.parent, 0o555)
    report = verify.verify_entry(pushed.ctx, pushed.ctx.store(), r.entry, repair=True)  # what the daemon runs
    assert report is not None and report.repaired == ("val/img002.bin",)
    assert set(tree_digest(Path(r.path))) == {f"val/img{i:03d}.bin" for i in range(5)}  # nothing else appeared


def test_the_filesystem_reads_a_partial_cache_at_the_site(pushed: Hub, data: Path) -> None:
    r = pushed.cache("scans@v1", include="val/**")
    for entry in pushed.ls("scans@v1"):
        if entry.path.startswith("val/"):
            pushed.lake.backend.write(object_key(entry.sha256), b"gone")  # only the site can answer
    fs = _fs(pushed, include="val/**")
    assert fs.find("scans@v1") == [f"scans@v1/val/img{i:03d}.bin" for i in range(5)] + ["scans@v1/val/scratch.tmp"]
    assert fs.cat("scans@v1/val/scratch.tmp") == b"temporary"
    assert fs.ctx.store().last_used(r.entry) is not None  # the use was recorded on the partial entry


def test_cli_cache_include_exclude(pushed: Hub, data: Path, env: dict[str, str]) -> None:
    out = run_cli("cache", "scans@v1", "--include", "val/**", "--exclude", "*.tmp", "--json", env=env, check=True)
    body = json.loads(out.stdout)
    assert body["files"] == 5 and body["entry"].startswith(body["commit"] + "-")
    bad = run_cli("cache", "scans@v1", "--include", "../x", env=env)
    assert bad.returncode == 7 and "bad file pattern" in bad.stderr
    mixed = run_cli("cache", "scans@v1", "--include", "val/**", "--shard", "0/2", env=env)
    assert mixed.returncode == 2 and "partial cache" in mixed.stderr


def test_one_instance_per_environment(pushed: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = fsspec.filesystem("cachehub")
    assert fsspec.filesystem("cachehub") is first  # fsspec's instance cache, as for s3fs
    monkeypatch.setenv("CACHEHUB_HOME", str(tmp_path / "another-home"))
    assert fsspec.filesystem("cachehub") is not first  # another home, lake or site: another instance


def test_character_classes_keep_their_ranges() -> None:
    s = Selection.of("shard-[0-3].bin")
    assert s.matches("shard-2.bin") and not s.matches("shard--.bin") and not s.matches("shard-5.bin")
    assert Selection.of("x[!ab].txt").matches("xc.txt") and not Selection.of("x[!ab].txt").matches("xa.txt")


def test_purge_removes_the_partial_caches_of_the_commit(pushed: Hub) -> None:
    part = pushed.cache("scans@v1", include="val/**")
    result = pushed.purge("scans@v1", reason="erasure request #44")
    assert result.sites_evicted == ("local",)
    assert not Path(part.path).exists() and not pushed.status()[0].commits
