"""The catalog alone, on a real SQLite file: migrations, tombstones, runs, restores, hash cache, audit."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cachehub.catalog import MIGRATIONS, SCHEMA_VERSION, Catalog
from cachehub.errors import ConfigError
from cachehub.model import CacheEntry, Commit, Tag, Tombstone
from cachehub.results import Subscription


def commit(cid: str, dataset: str = "ds", *, parents: tuple[str, ...] = (), created: str = "2026-01-01T00:00:00Z", run: str | None = None) -> Commit:
    return Commit(cid, dataset, "m" * 64, 1, 10, parents, "ann", "h1", "msg", created, run=run)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    db = Catalog(tmp_path / "catalog.db")
    yield db
    db.close()


def test_migrations_are_numbered_and_applied_once(tmp_path: Path) -> None:
    numbers = [n for n, _ in MIGRATIONS]
    assert numbers == list(range(1, len(numbers) + 1)) and SCHEMA_VERSION == numbers[-1]
    path = tmp_path / "c.db"
    Catalog(path).close()
    Catalog(path).close()  # opening again applies nothing twice
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_catalog_from_a_newer_cachehub_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    Catalog(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match="upgrade cachehub"):
        Catalog(path)


def test_a_tombstone_takes_the_commit_its_tags_and_cache_entries_out_of_the_index(catalog: Catalog) -> None:
    a, b = commit("a" * 64), commit("b" * 64, created="2026-01-02T00:00:00Z")
    catalog.add_commits([a, b])
    catalog.set_tag(Tag("ds", "v1", a.id), None)
    catalog.add_cache_entry(CacheEntry("s", a.id, "ds", "/p", 1, 10, "2026-01-01T00:00:00Z", None))
    catalog.add_tombstone(Tombstone(a.id, "ds", "erasure", "bob", "2026-02-01T00:00:00Z"))
    assert catalog.commit(a.id) is None and catalog.tags("ds") == [] and catalog.cache_entries() == []
    assert catalog.latest("ds") == b
    found = catalog.tombstone("ds", a.id[:8])
    assert found is not None and (found.commit, found.reason, found.purged_by) == (a.id, "erasure", "bob")
    assert catalog.tombstone("ds", "b" * 8) is None and catalog.tombstone("other", a.id[:8]) is None
    assert [t.commit for t in catalog.tombstones()] == [a.id]


def test_runs_inputs_and_outputs(catalog: Catalog) -> None:
    catalog.open_run("r1", user="ann", host="h1", site="s", started="t0", origin="generated")
    catalog.open_run("r1", user="zed", host="h9", site="x", started="t9", origin="other")  # first reader wins
    catalog.add_run_input("r1", "ds", "c" * 64, "v1", "s", "t0")
    catalog.add_run_input("r1", "ds", "c" * 64, "latest", "s", "t1")  # ignored: one row per run and commit
    assert catalog.run("r1")["user"] == "ann" and catalog.run_inputs() == [("r1", "ds", "c" * 64, "v1", "s")]
    record = {
        "id": "r1", "user": "ann", "host": "h1", "site": "s", "started": "t0", "ended": "t5", "status": "succeeded",
        "exit_code": 0, "duration": 5.0, "command": ["train"], "origin": "cachehub run",
        "inputs": [{"dataset": "ds", "commit": "c" * 64, "ref": "prod", "site": "s"}],
        "outputs": [{"dataset": "model", "commit": "d" * 64}],
    }  # fmt: skip
    catalog.save_run(record)
    assert catalog.run("r1")["status"] == "succeeded" and catalog.run("r1")["command"] == '["train"]'
    assert catalog.run_inputs() == [("r1", "ds", "c" * 64, "prod", "s")]  # the ref the user gave replaces use()'s
    assert catalog.run_outputs() == [("r1", "model", "d" * 64)]
    catalog.add_commits([commit("e" * 64, run="r2")])
    assert ("r2", "ds", "e" * 64) in catalog.run_outputs() and catalog.commit("e" * 64).run == "r2"  # type: ignore[union-attr]


def test_restores_are_recorded_once(catalog: Catalog) -> None:
    assert catalog.add_restore("c" * 64, "ds", "/w", "h1", "ann", "t0")
    assert not catalog.add_restore("c" * 64, "ds", "/w", "h1", "ann", "t0")
    assert catalog.add_restore("c" * 64, "ds", "/w", "h1", "ann", "t1")
    assert [r[-1] for r in catalog.restores()] == ["t0", "t1"]


def test_hash_rows_come_back_in_path_order_from_where_asked(catalog: Catalog) -> None:
    rows = [(f"/d/{n}", 1, 2, 3, 4, n * 64) for n in "cab"]
    catalog.save_hashes(rows)
    catalog.save_hashes([("/d/a", 9, 2, 3, 4, "z" * 64)])  # replaced
    assert [r[0] for r in catalog.hash_rows_from("/d/b")] == ["/d/b", "/d/c"]
    assert list(catalog.hash_rows_from("/d/a"))[0] == ("/d/a", 9, 2, 3, 4, "z" * 64)


def test_audit_events_ship_once_and_import_idempotently(tmp_path: Path, catalog: Catalog) -> None:
    catalog.audit("push", dataset="ds", commit="c" * 64, files=3)
    catalog.audit("tag", dataset="ds", ref="v1")
    pending = catalog.unshipped_events(catalog.origin)
    assert [e["action"] for e in pending] == ["push", "tag"] and [e["origin_seq"] for e in pending] == [1, 2]
    assert pending[1]["prev"] == pending[0]["hash"]  # a hash chain
    catalog.mark_shipped(e["seq"] for e in pending)
    assert catalog.unshipped_events(catalog.origin) == []
    wire = [{**{k: e[k] for k in e if k not in ("seq", "origin_seq")}, "seq": e["origin_seq"]} for e in pending]
    other = Catalog(tmp_path / "other.db")
    assert other.import_events(wire) == 2 and other.import_events(wire) == 0
    assert other.count_audit_events() == 2 and other.unshipped_events(catalog.origin) == []
    other.close()


def test_subscriptions_are_typed(catalog: Catalog) -> None:
    sub_id = catalog.add_subscription("ds", "latest", "gpu-a", 600.0)
    assert catalog.add_subscription("ds", "latest", "gpu-a", 60.0) == sub_id  # again: the interval changes
    [sub] = catalog.subscriptions()
    assert isinstance(sub, Subscription) and (sub.dataset, sub.ref, sub.site, sub.every) == ("ds", "latest", "gpu-a", 60.0)
    assert catalog.subscription(sub_id) == sub and catalog.subscription(sub_id + 1) is None
    assert catalog.remove_subscription("ds", "latest", "gpu-a") and catalog.subscriptions() == []
