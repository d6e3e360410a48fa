"""The lake format: the system of record, laid out so that it describes itself.

This module is the one owner of every key in the lake and of every document type stored there.
No other module spells a key or reads a document's bytes::

    cachehub-lake.json                           {"format": "cachehub-lake", "format_version": 1,
                                                  "server": what `cachehub doctor` found (optional)}
    objects/sha256/<aa>/<sha256>                 file content, addressed by the SHA-256 of its bytes
    chunks/sha256/<aa>/<sha256>                  chunk map of a large object (gzip text, chunks.py)
    manifests/sha256/<aa>/<sha256>.tsv.gz        manifests, addressed by the SHA-256 of their text
    datasets/<name>/commits/<commit-id>.json     commit metadata; commit-id = SHA-256 of the file
    datasets/<name>/tags/<tag>.json              {"commit": <commit-id>, ...}, moved by CAS
    datasets/<name>/tombstones/<commit-id>.json  a purged commit: who, when, why
    runs/<run-id>.json                           a run: its command, inputs, outputs, status
    audit/<origin>/<first>-<last>.jsonl          shipped audit events of one catalog, create-only
    doctor/<host>-<id>/...                       doctor's probe objects, removed when it ends

See docs/lake-format.md. Everything here is plain files and JSON, readable without cachehub.
Manifests are also kept on local disk once verified (``Lake.manifest``): that cache is part of
this module too, so nothing else knows where it lives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

from cachehub.backends import Backend

from . import chunks
from .errors import CachehubError, ConflictError, FormatError, IntegrityError, LakeError, ServerGapError
from .fsutil import HOST, now_iso, unique_suffix
from .model import Commit, Tag, Tombstone

log = logging.getLogger("cachehub.lake")
_HEX64 = re.compile(r"[0-9a-f]{64}")
LAKE_FORMAT = "cachehub-lake"
LAKE_FORMAT_VERSION = 1
COMMIT_FORMAT = "cachehub-commit"
COMMIT_FORMAT_VERSION = 1
TAG_FORMAT = "cachehub-tag"
TAG_FORMAT_VERSION = 1
TOMBSTONE_FORMAT = "cachehub-tombstone"
RUN_FORMAT = "cachehub-run"
MARKER = "cachehub-lake.json"
CHECK_PIECE = 8 * 1024 * 1024  # objects above this are streamed and hashed piece by piece when checked


async def _hash_in_thread(digest: "hashlib._Hash", data: object) -> None:
    import asyncio

    await asyncio.to_thread(digest.update, data)  # type: ignore[arg-type]


def canonical_json(value: object) -> bytes:
    """The one serialisation whose hash is an id: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -- keys ------------------------------------------------------------------------------------
def object_key(sha256: str) -> str:
    return f"objects/sha256/{sha256[:2]}/{sha256}"


def chunk_map_key(sha256: str) -> str:
    return f"chunks/sha256/{sha256[:2]}/{sha256}"


def manifest_key(manifest_id: str) -> str:
    return f"manifests/sha256/{manifest_id[:2]}/{manifest_id}.tsv.gz"


def commit_key(dataset: str, commit_id: str) -> str:
    return f"datasets/{dataset}/commits/{commit_id}.json"


def tag_key(dataset: str, tag: str) -> str:
    return f"datasets/{dataset}/tags/{tag}.json"


def tombstone_key(dataset: str, commit_id: str) -> str:
    return f"datasets/{dataset}/tombstones/{commit_id}.json"


def doctor_prefix(probe_id: str) -> str:
    return f"doctor/{probe_id}"


def run_key(run_id: str) -> str:
    return f"runs/{run_id}.json"


def audit_batch_key(origin: str, first: int, last: int) -> str:
    return f"audit/{origin}/{first:012d}-{last:012d}.jsonl"


# -- documents -------------------------------------------------------------------------------
def commit_document(
    *,
    dataset: str,
    manifest: str,
    files: int,
    bytes: int,  # noqa: A002 - the document's field name
    parents: list[str] | tuple[str, ...],
    author: str,
    host: str,
    message: str,
    created: str,
    derived_from: list[str] | tuple[str, ...] = (),
    transform: str | None = None,
    run: str | None = None,
) -> dict:
    """The body of a commit document; its canonical JSON's SHA-256 is the commit id."""
    body = {
        "format": COMMIT_FORMAT,
        "format_version": COMMIT_FORMAT_VERSION,
        "dataset": dataset,
        "manifest": manifest,
        "files": files,
        "bytes": bytes,
        "parents": list(parents),
        "author": author,
        "host": host,
        "message": message,
        "created": created,
        "derived_from": list(derived_from),
        "transform": transform,
    }
    if run:
        body["run"] = run  # optional key: commits without it keep the ids they always had
    return body


def commit_body(commit: Commit) -> dict:
    return commit_document(
        dataset=commit.dataset, manifest=commit.manifest, files=commit.files, bytes=commit.bytes, parents=commit.parents,
        author=commit.author, host=commit.host, message=commit.message, created=commit.created,
        derived_from=commit.derived_from, transform=commit.transform, run=commit.run,
    )  # fmt: skip


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


# the fields of an audit event that its hash covers (with the previous event's hash)
EVENT_FIELDS = ("time", "user", "host", "action", "dataset", "commit", "ref", "site", "details")


def audit_wire(event: dict) -> dict:
    """An audit event as it is shipped: its fields, its chain position and its hashes."""
    return {**{k: event[k] for k in EVENT_FIELDS}, "origin": event["origin"], "seq": event["origin_seq"], "prev": event["prev"], "hash": event["hash"]}


class Lake:
    """Reads and writes the lake format through one backend.

    ``manifest_cache`` is the local directory of verified manifest copies (``Lake.manifest``);
    without one, manifests are verified into a temporary directory on every call.
    """

    def __init__(self, backend: Backend, manifest_cache: Path | None = None) -> None:
        self.backend = backend
        self.url = backend.url
        self.manifest_cache = manifest_cache
        self._checked = False
        #: what ``cachehub doctor`` recorded about the server (the marker's ``server.facts``)
        self.server_facts: dict = {}

    def close(self) -> None:
        self.backend.close()

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
        self._take_marker(data)
        self._checked = True

    def check_readable(self) -> None:
        """Refuse a lake written by a newer cachehub (a missing marker means an empty lake), and
        take what doctor recorded about the server, so the backend degrades where it must."""
        try:
            data, _ = self.backend.read(MARKER)
        except FileNotFoundError:
            return
        self._take_marker(data)

    def _take_marker(self, data: bytes) -> None:
        """Check the marker's format and take what doctor recorded in it."""
        try:
            body = json.loads(data)
        except ValueError as exc:
            raise FormatError(f"{self.url}/{MARKER} is not JSON: restore it from a backup, or delete it and run `cachehub init`", key=MARKER) from exc
        _check_format(body, LAKE_FORMAT, LAKE_FORMAT_VERSION, f"the lake at {self.url}")
        self._take_server_facts(body)

    def _take_server_facts(self, marker: dict) -> None:
        server = marker.get("server")
        facts = server.get("facts") if isinstance(server, dict) else None
        self.server_facts = dict(facts) if isinstance(facts, dict) else {}
        self.backend.apply_server_facts(self.server_facts)

    def record_server_facts(self, facts: dict, *, checked_by: str) -> None:
        """Write doctor's findings into the marker (its ``server`` field), keeping the rest."""
        self.ensure_initialised()
        data, etag = self.backend.read(MARKER)
        body = json.loads(data)
        body["server"] = {"facts": facts, "checked_at": now_iso(), "checked_by": checked_by, "host": HOST}
        # the marker is the one document rewritten in place; a lost race with another doctor
        # leaves that doctor's equally fresh findings
        conditional = facts.get("if_match") is not False
        try:
            self.backend.write(MARKER, canonical_json(body), if_match=etag if conditional else None)
        except ConflictError:
            pass
        self._take_server_facts(body)

    def _refuse_unsafe_tag_write(self, dataset: str, tag: str) -> None:
        labels = {"create_only": "create-only writes (If-None-Match: *)", "if_match": "conditional writes (If-Match)"}
        gaps = [label for name, label in labels.items() if self.server_facts.get(name) is False]
        if gaps:
            raise ServerGapError(
                f"refusing to move tag {dataset}@{tag}: the lake's server at {getattr(self.backend, '_where', self.url)} "
                f"ignores {' and '.join(gaps)}, so a concurrent tag move could be lost without notice (found by "
                "`cachehub doctor`). Use a server that honours them, then run `cachehub doctor` again to record it; "
                "commits and caching by commit id still work",
                key=tag_key(dataset, tag),
            )

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
        """A commit document, checked: its bytes hash to its id (else IntegrityError, exit 9) and
        it is a commit of a format this cachehub reads (else FormatError, exit 12). Either error
        names the key and the fix."""
        key = commit_key(dataset, commit_id)
        data, _ = self.backend.read(key)
        fix = (
            "restore that key from a backup of the lake, or push the directory again (a new commit); "
            "`cachehub catalog rebuild` lists every damaged document"
        )
        try:
            commit = commit_from_bytes(data, expected_id=commit_id)
        except IntegrityError as exc:
            raise IntegrityError(f"{exc} (key {key}); {fix}", key=key) from None
        except FormatError as exc:
            raise FormatError(f"{exc} (key {key}); {fix}", key=key) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"commit {commit_id} (key {key}) lacks a field or has a wrong one ({exc!r}); {fix}", key=key) from None
        if commit.dataset != dataset:
            raise IntegrityError(f"commit {commit_id} under datasets/{dataset}/ says it belongs to {commit.dataset!r} (key {key}); {fix}", key=key)
        return commit

    def has_commit(self, dataset: str, commit_id: str) -> bool:
        """Is the commit document there (read by its key, no listing)?"""
        return self.backend.exists(commit_key(dataset, commit_id))

    def delete_commit(self, dataset: str, commit_id: str) -> None:
        self.backend.delete(commit_key(dataset, commit_id))

    def commit_ids(self, dataset: str) -> list[str]:
        return self._names(f"datasets/{dataset}/commits/")

    def datasets(self) -> list[str]:
        return self.backend.list_dirs("datasets")

    def commit_listings(self) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        """Every (dataset, commit id) the lake lists, two ways: by folder (a delimiter listing of
        ``datasets/``, then each dataset's ``commits/``) and from one flat listing of every key
        under ``datasets/``. A server whose delimiter listing leaves out prefixes holding only
        deeper keys makes them differ; nothing that deletes may then trust either."""
        by_folder = {(ds, cid) for ds in self.datasets() for cid in self.commit_ids(ds)}
        flat = set()
        for key in self.backend.list("datasets/"):
            parts = key.split("/")
            if len(parts) == 4 and parts[0] == "datasets" and parts[2] == "commits" and parts[3].endswith(".json"):
                flat.add((parts[1], parts[3][: -len(".json")]))
        return by_folder, flat

    def _names(self, prefix: str, suffix: str = ".json") -> list[str]:
        """The names (without ``suffix``) of the documents directly under ``prefix``."""
        out = []
        for key in self.backend.list(prefix):
            name = key.rsplit("/", 1)[-1]
            if name.endswith(suffix):
                out.append(name[: -len(suffix)])
        return out

    # -- tags --------------------------------------------------------------------------------
    def read_tag(self, dataset: str, tag: str) -> tuple[str, str] | None:
        """(commit id, etag) of a tag, or None."""
        key = tag_key(dataset, tag)
        try:
            data, etag = self.backend.read(key)
        except FileNotFoundError:
            return None
        fix = f"point it again with `cachehub tag {dataset}@COMMIT {tag} --force`, or delete that key"
        try:
            body = json.loads(data)
            _check_format(body, TAG_FORMAT, TAG_FORMAT_VERSION, f"tag {dataset}@{tag}")
            commit_id = body["commit"]
            if not isinstance(commit_id, str) or not _HEX64.fullmatch(commit_id):
                raise ValueError(f"its commit {commit_id!r} is not a commit id")
        except FormatError as exc:
            raise FormatError(f"{exc} (key {key}); {fix}", key=key) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"tag {dataset}@{tag} in the lake is damaged ({exc}) (key {key}); {fix}", key=key) from None
        return commit_id, etag

    def tag_etag(self, dataset: str, tag: str) -> str:
        """The etag of a tag document, whatever it holds (to replace a damaged one by CAS)."""
        return self.backend.read(tag_key(dataset, tag))[1]

    def tags(self, dataset: str, problems: list[CachehubError] | None = None) -> list[Tag]:
        """Every tag of a dataset; a damaged tag document is left out and, with ``problems``,
        reported there (one bad document never hides the rest of the lake)."""
        out = []
        for name in self._names(f"datasets/{dataset}/tags/"):
            try:
                found = self.read_tag(dataset, name)
            except FormatError as exc:
                log.warning("%s", exc)
                if problems is not None:
                    problems.append(exc)
                continue
            if found:
                out.append(Tag(dataset, name, found[0]))
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
        self._refuse_unsafe_tag_write(dataset, tag)
        if expect is False:
            return self.backend.write(key, data, if_none_match=True)
        if expect is None:
            current = self.read_tag(dataset, tag)
            if current is None:
                return self.backend.write(key, data, if_none_match=True)
            return self.backend.write(key, data, if_match=current[1])
        return self.backend.write(key, data, if_match=expect)

    def delete_tag(self, dataset: str, tag: str) -> None:
        self.backend.delete(tag_key(dataset, tag))

    # -- tombstones --------------------------------------------------------------------------
    def write_tombstone(self, tombstone: Tombstone) -> None:
        body = {
            "format": TOMBSTONE_FORMAT,
            "format_version": 1,
            "dataset": tombstone.dataset,
            "commit": tombstone.commit,
            "reason": tombstone.reason,
            "purged_by": tombstone.purged_by,
            "host": tombstone.host,
            "purged": tombstone.purged,
        }
        self.backend.write(tombstone_key(tombstone.dataset, tombstone.commit), canonical_json(body))

    def tombstones(self, dataset: str) -> list[Tombstone]:
        out = []
        for commit_id in self._names(f"datasets/{dataset}/tombstones/"):
            body = json.loads(self.backend.read(tombstone_key(dataset, commit_id))[0])
            out.append(Tombstone(body["commit"], body["dataset"], body["reason"], body["purged_by"], body["purged"], body.get("host", "")))
        return out

    # -- runs --------------------------------------------------------------------------------
    def write_run(self, record: dict) -> None:
        """Write (or rewrite: a run's document follows its life) ``runs/<id>.json``."""
        self.backend.write(run_key(record["id"]), canonical_json({"format": RUN_FORMAT, "format_version": 1, **record}))

    def runs(self) -> list[dict]:
        return [json.loads(self.backend.read(run_key(run_id))[0]) for run_id in self._names("runs/")]

    # -- the audit trail ---------------------------------------------------------------------
    def write_audit_batch(self, origin: str, events: list[dict]) -> str:
        """Ship one catalog's events (in chain order) as one create-only object; return its key.

        ConflictError if the key exists: shipped history is never overwritten.
        """
        key = audit_batch_key(origin, events[0]["origin_seq"], events[-1]["origin_seq"])
        lines = b"".join(canonical_json(audit_wire(e)) + b"\n" for e in events)
        self.backend.write(key, lines, if_none_match=True)
        return key

    def audit_batch_matches(self, origin: str, events: list[dict]) -> bool:
        """Does the lake's batch for these events hold exactly them (a ship that died before it
        marked them shipped), rather than other events under the same key (a diverged trail)?"""
        key = audit_batch_key(origin, events[0]["origin_seq"], events[-1]["origin_seq"])
        try:
            data, _ = self.backend.read(key)
        except FileNotFoundError:
            return False
        return data == b"".join(canonical_json(audit_wire(e)) + b"\n" for e in events)

    def audit_events(self) -> Iterator[dict]:
        """Every shipped audit event (wire form), batch by batch in key order."""
        for key in sorted(k for k in self.backend.list("audit/") if k.endswith(".jsonl")):
            data, _ = self.backend.read(key)
            for line in data.splitlines():
                if line.strip():
                    yield json.loads(line)

    # -- manifests ---------------------------------------------------------------------------
    def _cached_manifest(self, manifest_id: str) -> Path | None:
        if self.manifest_cache is None:
            return None
        return self.manifest_cache / manifest_id[:2] / f"{manifest_id}.tsv.gz"

    def manifest(self, manifest_id: str) -> Path:
        """A local copy of a manifest, verified and validated (downloaded once into the cache).

        The copy enters the cache (one rename) only once its text hashes to ``manifest_id``
        and every line has passed validation (hash shape, size, path safety, order), so
        readers of the cache may rely on both; a hostile manifest raises here and is not kept.
        """
        from .manifest import manifest_id_of_file, validate_manifest_file

        path = self._cached_manifest(manifest_id)
        if path is None:
            import tempfile

            path = Path(tempfile.mkdtemp(prefix="cachehub-manifests-")) / f"{manifest_id}.tsv.gz"
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
            key = manifest_key(manifest_id)
            fix = "push the commit's directory again (a new commit), or restore that key from a backup of the lake"
            try:
                actual = manifest_id_of_file(tmp)
            except (EOFError, OSError, zlib.error) as exc:  # truncated, or not gzip at all
                raise IntegrityError(
                    f"manifest {manifest_id} in the lake is damaged: not a complete gzip file ({exc}) (key {key}); {fix}", key=key
                ) from None
            if actual != manifest_id:
                raise IntegrityError(f"manifest {manifest_id} in the lake is damaged (hashes to {actual}) (key {key}); {fix}", key=key)
            try:
                validate_manifest_file(tmp, name=key)
            except CachehubError as exc:  # its bytes are what its id says, but not a manifest we may use
                raise type(exc)(f"the lake's {exc}: refused; {fix}", key=key) from None
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    def put_manifest(self, manifest_id: str, local: Path) -> None:
        """Upload a manifest written here (if the lake lacks it) and keep it as the verified copy.

        ``local`` is moved into the local cache: it was written from entries this process
        validated and hashed, so it is as good as a verified download.
        """
        key = manifest_key(manifest_id)
        if not self.backend.exists(key):
            self.backend.write(key, local.read_bytes())
        cached = self._cached_manifest(manifest_id)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, cached)

    def delete_manifest(self, manifest_id: str) -> None:
        """Remove a manifest from the lake and from the local cache."""
        self.backend.delete(manifest_key(manifest_id))
        cached = self._cached_manifest(manifest_id)
        if cached is not None:
            cached.unlink(missing_ok=True)

    # -- content objects and their chunk maps (the data path) --------------------------------
    def delete_object(self, sha256: str) -> None:
        self.backend.delete(object_key(sha256))

    async def aobject_exists(self, sha256: str) -> bool:
        return await self.backend.aexists(object_key(sha256))

    async def aget_object(self, sha256: str) -> object:
        return await self.backend.aget(object_key(sha256))

    def get_object_range(self, sha256: str, start: int, end: int) -> object:
        return self.backend.read_range(object_key(sha256), start, end)

    async def aget_object_range(self, sha256: str, start: int, end: int) -> object:
        return await self.backend.aget_range(object_key(sha256), start, end)

    async def acheck_object(self, sha256: str, size: int) -> str | None:
        """Read the lake's copy of an object back and hash it: None if it is whole, else what is
        wrong ("missing", or how it is damaged). An object above ``CHECK_PIECE`` is streamed
        (one GET) and hashed as it arrives, so memory stays bounded whatever its size, and a
        copy shorter or longer than its manifest says is reported as damaged, not as an error."""
        key = object_key(sha256)
        digest = hashlib.sha256()
        got = 0
        try:
            if size <= CHECK_PIECE:
                body = await self.backend.aget(key)
                got = len(body)  # type: ignore[arg-type]
                await _hash_in_thread(digest, body)
            else:
                async for piece in self.backend.astream(key, CHECK_PIECE):
                    got += len(piece)  # type: ignore[arg-type]
                    await _hash_in_thread(digest, piece)
        except FileNotFoundError:
            return "missing"
        if got != size:
            return f"damaged: {got} bytes where {size} were expected"
        if digest.hexdigest() != sha256:
            return f"damaged: its bytes hash to {digest.hexdigest()}"
        return None

    async def aput_object(self, sha256: str, data: object) -> None:
        await self.backend.aput(object_key(sha256), data, sha256=sha256)  # type: ignore[arg-type]

    async def areplace_object(self, sha256: str, data: bytes) -> None:
        """Put verified bytes over a missing or damaged lake copy (``push --repair``)."""
        await self.backend.areplace(object_key(sha256), data, sha256=sha256)

    async def aput_object_if_absent(self, sha256: str, data: object) -> bool:
        return await self.backend.aput_if_absent(object_key(sha256), data, sha256=sha256)  # type: ignore[arg-type]

    def read_chunk_map(self, sha256: str, *, size: int) -> chunks.ChunkMap:
        """The chunk map of a large object; FileNotFoundError if it has none, FormatError if damaged."""
        return chunks.decode(self.backend.read(chunk_map_key(sha256))[0], size=size)

    async def acheck_chunk_map(self, sha256: str, size: int) -> str | None:
        """None if the chunk map of a large object is there and decodes to its size, else what
        is wrong ("missing" or how it is damaged)."""
        import asyncio

        try:
            await asyncio.to_thread(self.read_chunk_map, sha256, size=size)
        except FileNotFoundError:
            return "missing"
        except (FormatError, IntegrityError, ValueError, zlib.error, EOFError) as exc:  # not LakeError: a lake down is no damage
            return f"damaged: {exc}"
        return None

    async def ahas_chunk_map(self, sha256: str) -> bool:
        return await self.backend.aexists(chunk_map_key(sha256))

    async def aput_chunk_map(self, sha256: str, chunk_map: chunks.ChunkMap, *, replace: bool = False) -> None:
        """Store the chunk map of a large object; ``replace`` puts it over a damaged copy."""
        blob = chunks.encode(chunk_map)
        put = self.backend.areplace if replace else self.backend.aput
        await put(chunk_map_key(sha256), blob, sha256=hashlib.sha256(blob).hexdigest())
