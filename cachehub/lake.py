"""The lake format: the system of record, laid out so that it describes itself.

::

    cachehub-lake.json                         {"format": "cachehub-lake", "format_version": 1}
    objects/sha256/<aa>/<sha256>               file content, addressed by the SHA-256 of its bytes
    manifests/sha256/<aa>/<sha256>.tsv.gz      manifests, addressed by the SHA-256 of their text
    datasets/<name>/commits/<commit-id>.json   commit metadata; commit-id = SHA-256 of the file
    datasets/<name>/tags/<tag>.json            {"commit": <commit-id>, ...}, moved by CAS

See docs/lake-format.md. Everything here is plain files and JSON, readable without cachehub.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from cachehub.backends import Backend

from .errors import ConflictError, FormatError, IntegrityError, LakeError
from .fsutil import HOST, unique_suffix
from .model import Commit, Tag

LAKE_FORMAT = "cachehub-lake"
LAKE_FORMAT_VERSION = 1
COMMIT_FORMAT = "cachehub-commit"
COMMIT_FORMAT_VERSION = 1
TAG_FORMAT = "cachehub-tag"
TAG_FORMAT_VERSION = 1
MARKER = "cachehub-lake.json"


def canonical_json(value: object) -> bytes:
    """The one serialisation whose hash is an id: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def object_key(sha256: str) -> str:
    return f"objects/sha256/{sha256[:2]}/{sha256}"


def manifest_key(manifest_id: str) -> str:
    return f"manifests/sha256/{manifest_id[:2]}/{manifest_id}.tsv.gz"


def commit_key(dataset: str, commit_id: str) -> str:
    return f"datasets/{dataset}/commits/{commit_id}.json"


def tag_key(dataset: str, tag: str) -> str:
    return f"datasets/{dataset}/tags/{tag}.json"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def commit_body(commit: Commit) -> dict:
    return {
        "format": COMMIT_FORMAT,
        "format_version": COMMIT_FORMAT_VERSION,
        "dataset": commit.dataset,
        "manifest": commit.manifest,
        "files": commit.files,
        "bytes": commit.bytes,
        "parents": list(commit.parents),
        "author": commit.author,
        "host": commit.host,
        "message": commit.message,
        "created": commit.created,
        "derived_from": list(commit.derived_from),
        "transform": commit.transform,
        **({"run": commit.run} if commit.run else {}),
    }


def commit_from_bytes(data: bytes, *, expected_id: str | None = None) -> Commit:
    """Parse and check a commit document; its id is the SHA-256 of exactly these bytes."""
    commit_id = hashlib.sha256(data).hexdigest()
    if expected_id is not None and commit_id != expected_id:
        raise IntegrityError(f"commit {expected_id} is damaged in the lake (its bytes hash to {commit_id})")
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise FormatError(f"commit {commit_id} is not JSON: {exc}") from exc
    _check_format(body, COMMIT_FORMAT, COMMIT_FORMAT_VERSION, f"commit {commit_id}")
    return Commit(
        id=commit_id,
        dataset=body["dataset"],
        manifest=body["manifest"],
        files=int(body["files"]),
        bytes=int(body["bytes"]),
        parents=tuple(body.get("parents", ())),
        author=body.get("author", ""),
        host=body.get("host", ""),
        message=body.get("message", ""),
        created=body["created"],
        derived_from=tuple(body.get("derived_from", ())),
        transform=body.get("transform"),
        run=body.get("run"),
    )


def _check_format(body: object, name: str, version: int, what: str) -> None:
    if not isinstance(body, dict) or body.get("format") != name:
        raise FormatError(f"{what} is not a {name} document")
    if body.get("format_version") != version:
        raise FormatError(
            f"{what} has format_version {body.get('format_version')}; this cachehub reads {version}: upgrade cachehub"
        )


class Lake:
    """Reads and writes the lake format through one backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.url = backend.url
        self._checked = False

    # -- the marker --------------------------------------------------------------------------
    def ensure_initialised(self) -> None:
        """Create the lake marker if absent; refuse a lake of an unknown format version."""
        if self._checked:
            return
        try:
            data, _ = self.backend.read(MARKER)
        except FileNotFoundError:
            body = {"format": LAKE_FORMAT, "format_version": LAKE_FORMAT_VERSION, "created": now_iso()}
            try:
                self.backend.write(MARKER, canonical_json(body), if_none_match=True)
            except ConflictError:
                pass  # another writer created it at the same moment
            self._checked = True
            return
        try:
            body = json.loads(data)
        except ValueError as exc:
            raise FormatError(f"{self.url}/{MARKER} is not JSON") from exc
        _check_format(body, LAKE_FORMAT, LAKE_FORMAT_VERSION, f"the lake at {self.url}")
        self._checked = True

    def check_readable(self) -> None:
        """Refuse a lake written by a newer cachehub (a missing marker means an empty lake)."""
        try:
            data, _ = self.backend.read(MARKER)
        except FileNotFoundError:
            return
        _check_format(json.loads(data), LAKE_FORMAT, LAKE_FORMAT_VERSION, f"the lake at {self.url}")

    # -- commits -----------------------------------------------------------------------------
    def write_commit(self, commit_fields: dict) -> Commit:
        """Store a new commit document (create-only) and return it with its id."""
        data = canonical_json(commit_fields)
        commit = commit_from_bytes(data)
        try:
            self.backend.write(commit_key(commit.dataset, commit.id), data, if_none_match=True)
        except ConflictError:
            pass  # identical bytes, identical id: the commit is already there
        return commit

    def read_commit(self, dataset: str, commit_id: str) -> Commit:
        data, _ = self.backend.read(commit_key(dataset, commit_id))
        commit = commit_from_bytes(data, expected_id=commit_id)
        if commit.dataset != dataset:
            raise IntegrityError(f"commit {commit_id} under datasets/{dataset}/ says it belongs to {commit.dataset!r}")
        return commit

    def commit_ids(self, dataset: str) -> list[str]:
        prefix = f"datasets/{dataset}/commits/"
        out = []
        for key in self.backend.list(prefix):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(".json"):
                out.append(name[: -len(".json")])
        return out

    def datasets(self) -> list[str]:
        return self.backend.list_dirs("datasets")

    # -- tags --------------------------------------------------------------------------------
    def read_tag(self, dataset: str, tag: str) -> tuple[str, str] | None:
        """(commit id, etag) of a tag, or None."""
        try:
            data, etag = self.backend.read(tag_key(dataset, tag))
        except FileNotFoundError:
            return None
        body = json.loads(data)
        _check_format(body, TAG_FORMAT, TAG_FORMAT_VERSION, f"tag {dataset}@{tag}")
        return body["commit"], etag

    def tags(self, dataset: str) -> list[Tag]:
        out = []
        for key in self.backend.list(f"datasets/{dataset}/tags/"):
            name = key.rsplit("/", 1)[-1]
            if not name.endswith(".json"):
                continue
            found = self.read_tag(dataset, name[: -len(".json")])
            if found:
                out.append(Tag(dataset, name[: -len(".json")], found[0]))
        return out

    def write_tag(self, dataset: str, tag: str, commit_id: str, *, author: str, expect: str | None | bool) -> str:
        """Point ``tag`` at ``commit_id`` by compare-and-swap; return the new etag.

        ``expect=False`` creates only if absent; a string moves only if the tag's etag is still
        that; ``None`` means "whatever it is now" (``--force``), which still uses CAS on the
        value read just before so a concurrent move is never silently lost.
        """
        body = {
            "format": TAG_FORMAT,
            "format_version": TAG_FORMAT_VERSION,
            "dataset": dataset,
            "tag": tag,
            "commit": commit_id,
            "tagged_by": author,
            "host": HOST,
            "tagged_at": now_iso(),
        }
        data = canonical_json(body)
        key = tag_key(dataset, tag)
        if expect is False:
            return self.backend.write(key, data, if_none_match=True)
        if expect is None:
            current = self.read_tag(dataset, tag)
            if current is None:
                return self.backend.write(key, data, if_none_match=True)
            return self.backend.write(key, data, if_match=current[1])
        return self.backend.write(key, data, if_match=expect)

    # -- manifests and objects ---------------------------------------------------------------
    def fetch_manifest(self, manifest_id: str, cache_dir: Path) -> Path:
        """A local copy of a manifest, verified and validated (downloaded once into ``cache_dir``).

        The copy enters the cache (one rename) only once its text hashes to ``manifest_id``
        and every line has passed validation (hash shape, size, path safety, order), so
        readers of the cache may rely on both; a hostile manifest raises here and is not kept.
        """
        from .manifest import manifest_id_of_file, validate_manifest_file

        path = cache_dir / manifest_id[:2] / f"{manifest_id}.tsv.gz"
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{unique_suffix()}.tmp")
        try:
            try:
                self.backend.download(manifest_key(manifest_id), tmp)
            except FileNotFoundError:
                raise LakeError(
                    f"manifest {manifest_id} is missing from the lake {self.url}; the lake is damaged", key=manifest_id
                ) from None
            actual = manifest_id_of_file(tmp)
            if actual != manifest_id:
                raise IntegrityError(f"manifest {manifest_id} in the lake is damaged (hashes to {actual})")
            validate_manifest_file(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def iter_commits(self, dataset: str) -> Iterator[Commit]:
        for commit_id in self.commit_ids(dataset):
            yield self.read_commit(dataset, commit_id)
