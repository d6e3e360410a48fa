"""The object-store contract, on every server the tests can start (issue: hybrid-cloud lakes).

- SeaweedFS and moto (server mode) as S3, Azurite as Azure Blob: each passes the same backend
  contract, ``cachehub doctor``, and a push -> tag -> cache -> verify round trip by the CLI.
- ``rclone serve s3`` is the server with gaps: doctor names each, caching degrades safely
  (whole-object GETs), tag moves are refused with exit 20.
- GCS: no emulator from the registries speaks the XML API obstore uses; the generation
  compare-and-swap is tested at the unit level here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from cachehub.backends import open_backend
from cachehub.errors import ConfigError, ConflictError, IntegrityError, LakeError

from .conftest import object_store_lake, random_tree, run_cli, tree_digest
from .servers import AZURITE_ACCOUNT, AZURITE_KEY

SERVERS = ["seaweed", "moto", "azurite"]


@pytest.fixture
def store_env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    lake = object_store_lake(request.param, request, monkeypatch)
    monkeypatch.setenv("CACHEHUB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CACHEHUB_LAKE", lake)
    for var in ("CACHEHUB_CONFIG", "CACHEHUB_SITE"):
        monkeypatch.delenv(var, raising=False)
    return dict(os.environ)


def _backend(env: dict[str, str]):  # type: ignore[no-untyped-def]
    return open_backend(env["CACHEHUB_LAKE"], endpoint_url=env["CACHEHUB_ENDPOINT_URL"])


@pytest.mark.parametrize("store_env", SERVERS, indirect=True)
def test_backend_contract(store_env: dict[str, str]) -> None:
    """Create-only, compare-and-swap, ranges, listings, deletes: what every lake relies on."""
    b = _backend(store_env)
    try:
        b.write("t/doc.json", b"one", if_none_match=True)
        with pytest.raises(ConflictError):
            b.write("t/doc.json", b"two", if_none_match=True)
        data, token = b.read("t/doc.json")
        assert data == b"one" and token
        newer = b.write("t/doc.json", b"three", if_match=token)
        with pytest.raises(ConflictError):
            b.write("t/doc.json", b"four", if_match=token)  # stale
        assert b.read("t/doc.json") == (b"three", newer)
        payload = os.urandom(3000)
        b.write("objects/x/deep/er/blob", payload)
        assert bytes(b.read_range("objects/x/deep/er/blob", 1000, 1100)) == payload[1000:1100]
        assert bytes(asyncio.run(b.aget_range("objects/x/deep/er/blob", 0, 10))) == payload[:10]
        assert b.ranges  # no degradation on a server that answers 206
        assert b.list_dirs("objects") == ["x"] and b.list_dirs("objects/x") == ["deep"]
        assert sorted(b.list("t")) == ["t/doc.json"]
        with pytest.raises(FileNotFoundError):
            b.read("t/missing.json")
        assert not b.exists("t/missing.json")
        body = b"content-addressed"
        sha = hashlib.sha256(body).hexdigest()
        assert asyncio.run(b.aput_if_absent(f"o/{sha}", body, sha256=sha)) is True
        assert asyncio.run(b.aput_if_absent(f"o/{sha}", body, sha256=sha)) is False
        b.delete("t/doc.json")
        b.delete("t/doc.json")  # already gone: no error
        assert not b.exists("t/doc.json")
    finally:
        b.close()


@pytest.mark.parametrize("store_env", SERVERS, indirect=True)
def test_doctor_and_round_trip(store_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """init runs doctor and records it; push, tag, cache and verify work on each server."""
    env = store_env
    assert run_cli("init", env=env).returncode == 0
    marker = json.loads(_backend(env).read("cachehub-lake.json")[0])
    facts = marker["server"]["facts"]
    assert facts["create_only"] and facts["if_match"] and facts["ranges"] and facts["nested_listing"]
    doc = run_cli("doctor", "--json", env=env)
    report = json.loads(doc.stdout)
    states = {c["name"]: c["state"] for c in report["checks"]}
    assert {states[k] for k in ("create_only", "if_match", "ranges", "nested_listing", "clock_skew")} == {"ok"}, doc.stdout
    # checksums: ok where the server refuses a wrong x-amz-checksum-sha256 (SeaweedFS) or where
    # the client sends none and reads every upload back (Azure); degraded, with the read-back,
    # where the server stores it anyway (moto)
    expected = {"seaweed": "ok", "moto": "degraded", "azurite": "ok"}[request.node.callspec.params["store_env"]]
    assert states["checksums"] == expected, doc.stdout
    assert doc.returncode == (0 if expected == "ok" else 20) and report["ok"] is (expected == "ok")
    src = random_tree(tmp_path / "src", 30, seed=3)
    assert run_cli("push", str(src), "ds", "--tag", "v1", env=env).returncode == 0
    out = run_cli("cache", "ds@v1", env=env, check=True)
    path = run_cli("path", "ds@v1", env=env, check=True).stdout.strip()
    assert tree_digest(Path(path)) == tree_digest(src), out.stderr
    assert run_cli("verify", "ds@v1", env=env).returncode == 0
    assert run_cli("tag", "ds@v1", "v2", env=env).returncode == 0
    assert "v2" in run_cli("show", "ds@v2", env=env, check=True).stdout
    checked = json.loads(run_cli("lake", "verify", "--json", env=env, check=True).stdout)
    assert checked["ok"] and checked["checked_objects"] == checked["objects"] == 30


@pytest.mark.parametrize("store_env", ["rclone"], indirect=True)
def test_server_with_gaps(store_env: dict[str, str], tmp_path: Path) -> None:
    """rclone serve s3 answers ranges with 200, ignores conditional writes and stores uploads
    whose checksum is wrong: doctor names each gap, caching degrades safely, tags refuse."""
    env = store_env
    init = run_cli("init", env=env)
    assert init.returncode == 0 and "If-Match ignored" in init.stderr and "warning" in init.stderr
    doc = run_cli("doctor", env=env)
    assert doc.returncode == 20, doc.stdout
    lines = {line.split()[1]: line.split()[0] for line in doc.stdout.splitlines()[1:] if not line.startswith(" ")}
    assert lines == {
        "create_only": "missing", "if_match": "missing", "ranges": "degraded",
        "nested_listing": "ok", "checksums": "degraded", "clock_skew": "ok",
    }, doc.stdout  # fmt: skip
    assert "tag creation and moves are refused" in doc.stdout and "read back and hashed" in doc.stdout
    src = random_tree(tmp_path / "src", 20, seed=5, max_size=300_000)
    pushed = run_cli("push", str(src), "ds", "--json", env=env)
    assert pushed.returncode == 0, pushed.stderr
    commit = json.loads(pushed.stdout)["commit"]
    # tags cannot be moved safely: refused with the gap named, exit 20, nothing written
    refused = run_cli("tag", f"ds@{commit[:12]}", "v1", env=env)
    assert refused.returncode == 20 and "ignores create-only writes" in refused.stderr and "cachehub doctor" in refused.stderr
    assert "v1" not in run_cli("datasets", "--json", env=env).stdout
    # caching degrades to whole-object GETs (the server answers a ranged GET with 200)
    run_cli("cache", f"ds@{commit[:12]}", env=env, check=True)
    path = run_cli("path", f"ds@{commit[:12]}", env=env, check=True).stdout.strip()
    assert tree_digest(Path(path)) == tree_digest(src)
    assert run_cli("lake", "verify", env=env).returncode == 0  # ranged pieces, degraded to whole GETs


def test_degraded_paths_give_the_same_answers(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """With doctor's findings applied (no ranges, incomplete delimiter listings), the backend
    answers exactly as before, through whole-object GETs and the full listing."""
    url = object_store_lake("seaweed", request, monkeypatch)
    b = open_backend(url, endpoint_url=os.environ["CACHEHUB_ENDPOINT_URL"])
    payload = os.urandom(5000)
    for key in ("datasets/a/commits/1.json", "datasets/b/tags/t.json", "datasets/c/x/y/z", "top"):
        b.write(key, payload)
    before = (b.list_dirs("datasets"), b.list_dirs(""), bytes(b.read_range("top", 10, 4000)))
    b.apply_server_facts({"ranges": False, "nested_listing": False})
    after = (b.list_dirs("datasets"), b.list_dirs(""), bytes(b.read_range("top", 10, 4000)))
    assert before == after == (["a", "b", "c"], ["datasets"], payload[10:4000])
    assert bytes(asyncio.run(b.aget_range("top", 4990, 6000))) == payload[4990:]


def test_upload_read_back_catches_damage(tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the server does not check checksums, each upload is read back; a mismatch is put
    again, and a server that keeps damaging it is reported (never a delete: the key may be
    shared). The damage is injected (a stand-in for a server or network that flips bits, which
    no test server here does on purpose): the read-back returns other bytes."""
    url = object_store_lake("seaweed", request, monkeypatch)
    b = open_backend(url, endpoint_url=os.environ["CACHEHUB_ENDPOINT_URL"])
    b.apply_server_facts({"checksums": False})
    assert not b.uploads_verified()
    body = b"good bytes"
    sha = hashlib.sha256(body).hexdigest()
    real_aget = b.aget
    reads: list[str] = []

    def damaging(times: int):  # type: ignore[no-untyped-def]
        async def aget(key: str):  # type: ignore[no-untyped-def]
            reads.append(key)
            got = bytes(await real_aget(key))
            return b"bad" + got[3:] if len(reads) <= times else got

        return aget

    monkeypatch.setattr(b, "aget", damaging(1))  # damaged once: put again, then it reads back whole
    asyncio.run(b.aput(f"objects/{sha}", body, sha256=sha))
    assert len(reads) == 2 and b.read(f"objects/{sha}")[0] == body
    reads.clear()
    monkeypatch.setattr(b, "aget", damaging(99))  # damaged every time: reported, nothing deleted
    with pytest.raises(IntegrityError, match="read back after 3 uploads"):
        asyncio.run(b.aput(f"objects/{sha}", body, sha256=sha))
    assert len(reads) == 3 and b.exists(f"objects/{sha}")


def test_azure_errors_name_the_fix(azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    env = dict(os.environ, CACHEHUB_ENDPOINT_URL=azurite.endpoint, AZURE_STORAGE_ACCOUNT_NAME=AZURITE_ACCOUNT,
               AZURE_STORAGE_ACCOUNT_KEY=AZURITE_KEY)  # fmt: skip
    missing = run_cli("datasets", env=dict(env, CACHEHUB_LAKE="az://no-such-container/p", CACHEHUB_HOME=str(tmp_path / "h1")))
    assert missing.returncode == 11 and "container 'no-such-container' does not exist" in missing.stderr
    azurite.create_container("denied")
    wrong_key = dict(env, CACHEHUB_LAKE="az://denied/p", CACHEHUB_HOME=str(tmp_path / "h2"), AZURE_STORAGE_ACCOUNT_KEY="d3Jvbmcga2V5IHdyb25nIGtleQ==")
    denied = run_cli("datasets", env=wrong_key)
    assert denied.returncode == 11 and "access denied" in denied.stderr and "AZURE_STORAGE_ACCOUNT_KEY" in denied.stderr
    assert "d3Jvbmcga2V5" not in denied.stderr  # the key itself is never printed
    no_account = {k: v for k, v in env.items() if k != "AZURE_STORAGE_ACCOUNT_NAME"}
    unnamed = run_cli("datasets", env=dict(no_account, CACHEHUB_LAKE="az://denied/p", CACHEHUB_HOME=str(tmp_path / "h3")))
    assert unnamed.returncode == 13 and "AZURE_STORAGE_ACCOUNT_NAME" in unnamed.stderr


def test_gcs_compare_and_swap_uses_the_generation() -> None:
    """GCS moves a tag by the object's generation (x-goog-if-generation-match), not its ETag:
    the token the lake keeps is the generation, and a move sends it as the version."""
    from cachehub.backends.gcs import GCSBackend

    b = GCSBackend("gs://bucket/prefix", endpoint_url="http://127.0.0.1:9")
    meta = {"e_tag": '"abc"', "version": "1733"}
    assert b._token(meta) == "1733"
    assert b._update_mode("1733")["version"] == "1733"


def test_gcs_emulator_endpoint_never_asks_a_metadata_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against an http:// endpoint without credentials, requests carry a placeholder token: a
    refused port is reported as the lake not answering, not as a failed token request."""
    from cachehub.backends.gcs import GCSBackend

    for var in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CACHEHUB_RETRY_TIMEOUT", "0.5")
    b = GCSBackend("gs://bucket/prefix", endpoint_url="http://127.0.0.1:9")  # the discard port: refused
    with pytest.raises(LakeError, match="did not answer") as info:
        b.read("cachehub-lake.json")
    assert "token" not in str(info.value).lower()


def test_unsupported_and_misused_urls() -> None:
    with pytest.raises(ConfigError, match="az://CONTAINER/PREFIX"):
        open_backend("ftp://host/x")
    with pytest.raises(ConfigError, match="S3 credentials"):
        open_backend("az://c/p", credentials={"access_key_id": "a", "secret_access_key": "b"})


def test_read_only_credentials_still_init_and_read(azurite, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A training host with read-only credentials (an Azure SAS allowing read and list): init
    warns that the server could not be checked, and reading works; doctor itself exits 11."""
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    azurite.create_container("readonly")
    base = dict(os.environ, CACHEHUB_ENDPOINT_URL=azurite.endpoint, AZURE_STORAGE_ACCOUNT_NAME=AZURITE_ACCOUNT, CACHEHUB_LAKE="az://readonly/p")
    writer = dict(base, CACHEHUB_HOME=str(tmp_path / "writer"), AZURE_STORAGE_ACCOUNT_KEY=AZURITE_KEY)
    src = random_tree(tmp_path / "src", 5, seed=8)
    run_cli("push", str(src), "ds", "--tag", "v1", env=writer, check=True)
    sas = generate_container_sas(AZURITE_ACCOUNT, "readonly", account_key=AZURITE_KEY, permission=ContainerSasPermissions(read=True, list=True),
                                 expiry=datetime.now(timezone.utc) + timedelta(hours=1))  # fmt: skip
    reader = dict(base, CACHEHUB_HOME=str(tmp_path / "reader"), AZURE_STORAGE_SAS_TOKEN=sas)
    init = run_cli("init", env=reader)
    assert init.returncode == 0 and "not checked" in init.stderr and "cachehub doctor" in init.stderr, init.stderr
    assert sas not in init.stderr  # the token is never printed
    run_cli("cache", "ds@v1", env=reader, check=True)
    assert run_cli("doctor", env=reader).returncode == 11


def test_a_failed_doctor_keeps_the_recorded_workarounds(local_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe that fails half-way (a stand-in for a server dying mid-doctor: one check raises)
    leaves the facts recorded before in force and removes its probe objects."""
    from cachehub import doctor
    from cachehub.api import Hub

    with Hub() as hub:
        hub.lake.ensure_initialised()
        hub.lake.record_server_facts({"ranges": False, "checksums": False}, checked_by="test")

    def dies(*_args: object) -> None:
        raise LakeError("the lake at the test did not answer")

    monkeypatch.setattr(doctor, "_nested_listing", dies)
    with Hub() as hub:
        with pytest.raises(LakeError, match="did not answer"):
            hub.doctor()
        assert hub.lake.server_facts == {"ranges": False, "checksums": False}
        assert not list(hub.lake.backend.list("doctor"))
        assert not (Path(local_env["CACHEHUB_LAKE"]) / "doctor").exists() or not any((Path(local_env["CACHEHUB_LAKE"]) / "doctor").iterdir())


def test_a_slow_answer_is_not_mistaken_for_access_denied() -> None:
    """obstore prints the elapsed time ("in 401.2ms"): only a 401/403 status means denied."""
    from obstore.exceptions import GenericError

    b = open_backend("s3://bucket/p", endpoint_url="http://127.0.0.1:9")
    slow = b._translate(GenericError("Generic S3 error: Error performing GET http://127.0.0.1:9/x in 401.2ms - error sending request"), "x")
    assert "did not answer" in str(slow)
    denied = b._translate(GenericError("Error performing GET http://h/x in 3ms - Server returned non-2xx status code: 403 Forbidden"), "x")
    assert "access denied" in str(denied) and "AWS_ACCESS_KEY_ID" in str(denied)
