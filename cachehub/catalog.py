"""The catalog: a SQLite index of the lake plus local state (audit, runs, hash cache).

It lives on each host's local disk, never on NFS. Everything in it except the audit trail,
subscriptions and the hash cache can be rebuilt from the lake and the site roots
(``cachehub catalog rebuild``). This module holds every SQL statement of the project: other
modules call a ``Catalog`` method. Schema changes are numbered migrations (``MIGRATIONS``);
writes that belong together go in one ``with catalog.transaction():``.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CachehubError, ConfigError
from .fsutil import HOST
from .lake import EVENT_FIELDS, canonical_json, now_iso
from .model import CacheEntry, Commit, DiffEntry, Tag, Tombstone

if TYPE_CHECKING:
    from .results import Subscription

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE datasets (name TEXT PRIMARY KEY, refreshed TEXT);
        CREATE TABLE commits (
            id TEXT PRIMARY KEY, dataset TEXT NOT NULL, manifest TEXT NOT NULL,
            files INTEGER NOT NULL, bytes INTEGER NOT NULL, parents TEXT NOT NULL,
            author TEXT, host TEXT, message TEXT, created TEXT NOT NULL,
            derived_from TEXT NOT NULL DEFAULT '[]', transform TEXT
        );
        CREATE INDEX commits_dataset ON commits (dataset, created);
        CREATE TABLE tags (
            dataset TEXT NOT NULL, name TEXT NOT NULL, commit_id TEXT NOT NULL, etag TEXT,
            PRIMARY KEY (dataset, name)
        );
        CREATE TABLE audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, user TEXT, host TEXT,
            action TEXT NOT NULL, dataset TEXT, commit_id TEXT, ref TEXT, site TEXT,
            details TEXT NOT NULL DEFAULT '{}', prev TEXT NOT NULL, hash TEXT NOT NULL
        );
        CREATE INDEX audit_dataset ON audit (dataset, action);
        CREATE TABLE cache_entries (
            site TEXT NOT NULL, commit_id TEXT NOT NULL, dataset TEXT NOT NULL, path TEXT NOT NULL,
            files INTEGER NOT NULL, bytes INTEGER NOT NULL, cached_at TEXT NOT NULL,
            PRIMARY KEY (site, commit_id)
        );
        """,
    ),
]
MIGRATIONS.append(
    (
        2,
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        """,
    )
)
MIGRATIONS.append(
    (
        3,
        """
        CREATE TABLE subscriptions (
            id INTEGER PRIMARY KEY AUTOINCREMENT, dataset TEXT NOT NULL, ref TEXT NOT NULL,
            site TEXT NOT NULL, every REAL NOT NULL, created TEXT NOT NULL,
            UNIQUE (dataset, ref, site)
        );
        """,
    )
)
MIGRATIONS.append(
    (
        4,
        """
        ALTER TABLE audit ADD COLUMN origin TEXT;
        ALTER TABLE audit ADD COLUMN origin_seq INTEGER;
        ALTER TABLE audit ADD COLUMN shipped INTEGER NOT NULL DEFAULT 0;
        CREATE UNIQUE INDEX audit_origin ON audit (origin, origin_seq);
        CREATE TABLE runs (
            id TEXT PRIMARY KEY, user TEXT, host TEXT, site TEXT, started TEXT, ended TEXT,
            status TEXT, exit_code INTEGER, duration REAL, command TEXT, origin TEXT
        );
        CREATE TABLE run_inputs (
            run_id TEXT NOT NULL, dataset TEXT NOT NULL, commit_id TEXT NOT NULL, ref TEXT, site TEXT,
            time TEXT, PRIMARY KEY (run_id, commit_id)
        );
        CREATE TABLE run_outputs (
            run_id TEXT NOT NULL, dataset TEXT NOT NULL, commit_id TEXT NOT NULL, PRIMARY KEY (run_id, commit_id)
        );
        CREATE TABLE hash_cache (
            path TEXT PRIMARY KEY, ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, sha256 TEXT
        );
        CREATE TABLE tombstones (
            commit_id TEXT PRIMARY KEY, dataset TEXT NOT NULL, reason TEXT, user TEXT, time TEXT
        );
        CREATE TABLE restores (commit_id TEXT, dataset TEXT, path TEXT, host TEXT, user TEXT, time TEXT);
        """,
    )
)
MIGRATIONS.append(
    (
        5,
        """
        CREATE TABLE diffs (
            commit_id TEXT NOT NULL, parent_id TEXT NOT NULL, added INTEGER NOT NULL, removed INTEGER NOT NULL,
            modified INTEGER NOT NULL, listed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (commit_id, parent_id)
        );
        CREATE TABLE diff_files (
            commit_id TEXT NOT NULL, parent_id TEXT NOT NULL, seq INTEGER NOT NULL, path TEXT NOT NULL,
            change TEXT NOT NULL, old_size INTEGER, new_size INTEGER, PRIMARY KEY (commit_id, parent_id, seq)
        );
        CREATE INDEX audit_action ON audit (action, seq);
        """,
    )
)
SCHEMA_VERSION = MIGRATIONS[-1][0]


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


class Catalog:
    """One SQLite file; safe for several local processes (WAL, busy timeout)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        self.conn = conn
        self._origin: str | None = None
        self._migrate()

    def close(self) -> None:
        self.conn.close()

    @property
    def origin(self) -> str:
        """This catalog's id in audit trails that meet in the lake (made once, kept forever)."""
        if self._origin is None:
            value = self.get_meta("origin")
            if value is None:
                import uuid

                value = uuid.uuid4().hex[:16]
                self.conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('origin', ?)", (value,))
                value = self.get_meta("origin")
                self.conn.execute("UPDATE audit SET origin = ?, origin_seq = seq WHERE origin IS NULL", (value,))
            self._origin = value
        return self._origin  # type: ignore[return-value]

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"catalog {self.path} has schema {version}, newer than this cachehub ({SCHEMA_VERSION}): upgrade cachehub"
            )
        for number, script in MIGRATIONS:
            if number <= version:
                continue
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                if self.conn.execute("PRAGMA user_version").fetchone()[0] < number:
                    for statement in script.split(";"):
                        if statement.strip():
                            self.conn.execute(statement)
                    self.conn.execute(f"PRAGMA user_version = {number}")
                self.conn.execute("COMMIT")
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise

    def transaction(self) -> _Tx:
        """``with catalog.transaction():`` groups writes atomically."""
        return _Tx(self.conn)

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- commits and tags --------------------------------------------------------------------
    def add_commits(self, commits: Iterable[Commit]) -> None:
        commits = list(commits)
        if not commits:
            return
        self.conn.executemany(
            "INSERT OR REPLACE INTO commits (id, dataset, manifest, files, bytes, parents, author, host, message, created,"
            " derived_from, transform) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    c.id, c.dataset, c.manifest, c.files, c.bytes, json.dumps(list(c.parents)), c.author, c.host,
                    c.message, c.created, json.dumps(list(c.derived_from)), c.transform,
                )
                for c in commits
            ],
        )  # fmt: skip
        for c in commits:
            if c.run:  # lineage: the run that produced this commit
                self.add_run_output(c.run, c.dataset, c.id)

    def touch_dataset(self, name: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO datasets (name, refreshed) VALUES (?, ?)", (name, now_iso()))

    def set_tag(self, tag: Tag, etag: str | None) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO tags (dataset, name, commit_id, etag) VALUES (?,?,?,?)", (tag.dataset, tag.name, tag.commit, etag)
        )

    def replace_tags(self, dataset: str, tags: Iterable[Tag]) -> None:
        self.conn.execute("DELETE FROM tags WHERE dataset = ?", (dataset,))
        for tag in tags:
            self.set_tag(tag, None)

    def dataset_names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM datasets ORDER BY name")]

    def refreshed(self, name: str) -> str | None:
        """When the dataset was last read from the lake (ISO time), or None."""
        row = self.conn.execute("SELECT refreshed FROM datasets WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def has_dataset(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone() is not None

    def commit(self, commit_id: str) -> Commit | None:
        row = self.conn.execute("SELECT * FROM commits WHERE id = ?", (commit_id,)).fetchone()
        return self._commit(row) if row else None

    def commits_with_prefix(self, dataset: str, prefix: str) -> list[Commit]:
        rows = self.conn.execute(
            "SELECT * FROM commits WHERE dataset = ? AND id >= ? AND id < ? ORDER BY id",
            (dataset, prefix, prefix + "g"),
        ).fetchall()
        return [self._commit(r) for r in rows]

    def latest(self, dataset: str) -> Commit | None:
        row = self.conn.execute(
            "SELECT * FROM commits WHERE dataset = ? ORDER BY created DESC, id DESC LIMIT 1", (dataset,)
        ).fetchone()
        return self._commit(row) if row else None

    def log(self, dataset: str, limit: int | None = None) -> list[Commit]:
        sql = "SELECT * FROM commits WHERE dataset = ? ORDER BY created DESC, id DESC"
        params: tuple = (dataset,)
        if limit:
            sql += " LIMIT ?"
            params += (limit,)
        return [self._commit(r) for r in self.conn.execute(sql, params)]

    def log_page(self, dataset: str, *, limit: int, offset: int = 0) -> list[Commit]:
        """One page of a dataset's commits, newest first."""
        rows = self.conn.execute(
            "SELECT * FROM commits WHERE dataset = ? ORDER BY created DESC, id DESC LIMIT ? OFFSET ?", (dataset, limit, offset)
        )
        return [self._commit(r) for r in rows.fetchall()]

    def dataset_summaries(self) -> list[tuple]:
        """(name, commits, last change, files and bytes of the newest commit) of every dataset, one query."""
        return self.conn.execute(
            "SELECT d.name, count(c.id), max(c.created),"
            " (SELECT files FROM commits WHERE dataset = d.name ORDER BY created DESC, id DESC LIMIT 1),"
            " (SELECT bytes FROM commits WHERE dataset = d.name ORDER BY created DESC, id DESC LIMIT 1)"
            " FROM datasets d LEFT JOIN commits c ON c.dataset = d.name GROUP BY d.name ORDER BY d.name"
        ).fetchall()

    # -- diffs between a commit and its parent, kept once computed (the dashboard's history) ---
    def diffstat(self, commit_id: str, parent_id: str) -> tuple[int, int, int] | None:
        row = self.conn.execute(
            "SELECT added, removed, modified FROM diffs WHERE commit_id = ? AND parent_id = ?", (commit_id, parent_id)
        ).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def save_diff(self, commit_id: str, parent_id: str, entries: Iterable[DiffEntry], *, keep_files: int = 0) -> tuple[int, int, int]:
        """Keep a diff's counts, and its first ``keep_files`` changed files (0: counts only)."""
        counts = {"added": 0, "removed": 0, "modified": 0}
        with self.transaction():
            self.conn.execute("DELETE FROM diff_files WHERE commit_id = ? AND parent_id = ?", (commit_id, parent_id))
            batch: list[tuple] = []
            for seq, e in enumerate(entries):
                counts[e.change] += 1
                if seq < keep_files:
                    batch.append((commit_id, parent_id, seq, e.path, e.change, e.old_size, e.new_size))
                if len(batch) >= 5000:
                    self.conn.executemany("INSERT INTO diff_files VALUES (?,?,?,?,?,?,?)", batch)
                    batch.clear()
            self.conn.executemany("INSERT INTO diff_files VALUES (?,?,?,?,?,?,?)", batch)
            stat = (counts["added"], counts["removed"], counts["modified"])
            self.conn.execute("INSERT OR REPLACE INTO diffs VALUES (?,?,?,?,?,?)", (commit_id, parent_id, *stat, 1 if keep_files else 0))
        return stat

    def diff_listed(self, commit_id: str, parent_id: str) -> bool:
        """Are a kept diff's changed files kept too (not only its counts)?"""
        row = self.conn.execute("SELECT listed FROM diffs WHERE commit_id = ? AND parent_id = ?", (commit_id, parent_id)).fetchone()
        return bool(row and row[0])

    def diff_page(self, commit_id: str, parent_id: str, *, limit: int, offset: int = 0) -> list[DiffEntry]:
        rows = self.conn.execute(
            "SELECT path, change, old_size, new_size FROM diff_files WHERE commit_id = ? AND parent_id = ? ORDER BY seq LIMIT ? OFFSET ?",
            (commit_id, parent_id, limit, offset),
        )
        return [DiffEntry(*r) for r in rows.fetchall()]

    def tag(self, dataset: str, name: str) -> tuple[str, str | None] | None:
        row = self.conn.execute("SELECT commit_id, etag FROM tags WHERE dataset = ? AND name = ?", (dataset, name)).fetchone()
        return (row[0], row[1]) if row else None

    def tags(self, dataset: str) -> list[Tag]:
        rows = self.conn.execute("SELECT name, commit_id FROM tags WHERE dataset = ? ORDER BY name", (dataset,))
        return [Tag(dataset, r[0], r[1]) for r in rows]

    def tags_of(self, commit_id: str) -> tuple[str, ...]:
        rows = self.conn.execute("SELECT name FROM tags WHERE commit_id = ? ORDER BY name", (commit_id,))
        return tuple(r[0] for r in rows)

    def count_commits(self, dataset: str) -> int:
        return self.conn.execute("SELECT count(*) FROM commits WHERE dataset = ?", (dataset,)).fetchone()[0]

    def _commit(self, row: sqlite3.Row | tuple) -> Commit:
        (cid, dataset, manifest, files, nbytes, parents, author, host, message, created, derived, transform) = row
        return Commit(
            id=cid,
            dataset=dataset,
            manifest=manifest,
            files=files,
            bytes=nbytes,
            parents=tuple(json.loads(parents)),
            author=author or "",
            host=host or "",
            message=message or "",
            created=created,
            derived_from=tuple(json.loads(derived or "[]")),
            transform=transform,
            tags=self.tags_of(cid),
            run=self._run_of(cid),
        )

    def _run_of(self, commit_id: str) -> str | None:
        row = self.conn.execute("SELECT run_id FROM run_outputs WHERE commit_id = ? LIMIT 1", (commit_id,)).fetchone()
        return row[0] if row else None

    def clear_index(self) -> None:
        """Forget everything that is rebuilt from the lake and the sites (keeps the audit trail)."""
        for table in ("datasets", "commits", "tags", "cache_entries", "tombstones", "run_outputs"):
            self.conn.execute(f"DELETE FROM {table}")

    # -- cache entries -----------------------------------------------------------------------
    def add_cache_entry(self, entry: CacheEntry) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO cache_entries (site, commit_id, dataset, path, files, bytes, cached_at) VALUES (?,?,?,?,?,?,?)",
            (entry.site, entry.commit, entry.dataset, entry.path, entry.files, entry.bytes, entry.cached_at),
        )

    def remove_cache_entry(self, site: str, commit_id: str) -> None:
        self.conn.execute("DELETE FROM cache_entries WHERE site = ? AND commit_id = ?", (site, commit_id))

    def cache_entries(self, site: str | None = None) -> list[dict]:
        sql = "SELECT site, commit_id, dataset, path, files, bytes, cached_at FROM cache_entries"
        params: tuple = ()
        if site:
            sql += " WHERE site = ?"
            params = (site,)
        cols = ("site", "commit", "dataset", "path", "files", "bytes", "cached_at")
        return [dict(zip(cols, r, strict=True)) for r in self.conn.execute(sql + " ORDER BY site, cached_at", params)]

    # -- subscriptions (local state: kept by catalog rebuild) ---------------------------------
    def add_subscription(self, dataset: str, ref: str, site: str, every: float) -> int:
        self.conn.execute(
            "INSERT INTO subscriptions (dataset, ref, site, every, created) VALUES (?,?,?,?,?) "
            "ON CONFLICT (dataset, ref, site) DO UPDATE SET every = excluded.every",
            (dataset, ref, site, every, now_iso()),
        )
        row = self.conn.execute("SELECT id FROM subscriptions WHERE dataset=? AND ref=? AND site=?", (dataset, ref, site)).fetchone()
        return int(row[0])

    def remove_subscription(self, dataset: str, ref: str, site: str) -> bool:
        cur = self.conn.execute("DELETE FROM subscriptions WHERE dataset=? AND ref=? AND site=?", (dataset, ref, site))
        return cur.rowcount > 0

    def subscriptions(self) -> list[Subscription]:
        from .results import Subscription  # not at the top: resolve() never reads subscriptions

        rows = self.conn.execute("SELECT id, dataset, ref, site, every, created FROM subscriptions ORDER BY id")
        return [Subscription(*r) for r in rows]

    def subscription(self, sub_id: int) -> Subscription | None:
        from .results import Subscription

        row = self.conn.execute("SELECT id, dataset, ref, site, every, created FROM subscriptions WHERE id = ?", (sub_id,)).fetchone()
        return Subscription(*row) if row else None

    # -- tombstones (purged commits) ---------------------------------------------------------
    def add_tombstone(self, t: Tombstone) -> None:
        """Record a purge: the commit leaves the index (with its tags and cache entries) for good."""
        self.forget_commit(t.commit)
        self.conn.execute(
            "INSERT OR REPLACE INTO tombstones (commit_id, dataset, reason, user, time) VALUES (?,?,?,?,?)",
            (t.commit, t.dataset, t.reason, t.purged_by, t.purged),
        )

    def forget_commit(self, commit_id: str) -> None:
        self.conn.execute("DELETE FROM commits WHERE id = ?", (commit_id,))
        self.conn.execute("DELETE FROM tags WHERE commit_id = ?", (commit_id,))
        self.conn.execute("DELETE FROM cache_entries WHERE commit_id = ?", (commit_id,))

    def tombstone(self, dataset: str, prefix: str) -> Tombstone | None:
        """The purged commit of ``dataset`` whose id starts with ``prefix``, if any."""
        row = self.conn.execute(
            "SELECT commit_id, dataset, reason, user, time FROM tombstones WHERE dataset = ? AND commit_id >= ? AND commit_id < ?",
            (dataset, prefix, prefix + "g"),
        ).fetchone()
        return Tombstone(row[0], row[1], row[2] or "", row[3] or "", row[4] or "") if row else None

    def tombstones(self) -> list[Tombstone]:
        rows = self.conn.execute("SELECT commit_id, dataset, reason, user, time FROM tombstones ORDER BY time")
        return [Tombstone(r[0], r[1], r[2] or "", r[3] or "", r[4] or "") for r in rows]

    # -- runs, their inputs and outputs, restores (provenance) -------------------------------
    def save_run(self, record: dict) -> None:
        """Write a run (``runs.RunRecord`` fields) with its inputs and outputs, replacing what was there."""
        self.conn.execute(
            "INSERT OR REPLACE INTO runs (id, user, host, site, started, ended, status, exit_code, duration, command, origin)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (record["id"], record["user"], record["host"], record.get("site"), record["started"], record.get("ended"),
             record["status"], record.get("exit_code"), record.get("duration"), json.dumps(record.get("command", [])),
             record["origin"]),
        )  # fmt: skip
        for i in record.get("inputs", ()):  # replaces the row use() wrote, to keep the ref the user gave
            self.add_run_input(record["id"], i["dataset"], i["commit"], i.get("ref"), i.get("site"), record["started"], replace=True)
        for o in record.get("outputs", ()):
            self.add_run_output(record["id"], o["dataset"], o["commit"])

    def open_run(self, run_id: str, *, user: str, host: str, site: str | None, started: str, origin: str) -> None:
        """Note a run that is reading data (first reader wins; ``save_run`` may fill it in later)."""
        self.conn.execute(
            "INSERT OR IGNORE INTO runs (id, user, host, site, started, status, origin) VALUES (?,?,?,?,?,?,?)",
            (run_id, user, host, site, started, "open", origin),
        )

    def add_run_input(
        self, run_id: str, dataset: str, commit_id: str, ref: str | None, site: str | None, time: str, *, replace: bool = False
    ) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        self.conn.execute(
            f"{verb} INTO run_inputs (run_id, dataset, commit_id, ref, site, time) VALUES (?,?,?,?,?,?)",
            (run_id, dataset, commit_id, ref, site, time),
        )

    def add_run_output(self, run_id: str, dataset: str, commit_id: str) -> None:
        self.conn.execute("INSERT OR IGNORE INTO run_outputs (run_id, dataset, commit_id) VALUES (?,?,?)", (run_id, dataset, commit_id))

    def run(self, run_id: str) -> dict | None:
        row = self.conn.execute(
            "SELECT id, user, host, site, started, ended, status, exit_code, duration, command, origin FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
        cols = ("id", "user", "host", "site", "started", "ended", "status", "exit_code", "duration", "command", "origin")
        return dict(zip(cols, row, strict=True)) if row else None

    def runs(self) -> list[tuple]:
        """(id, user, host, status, started, command) of every run."""
        return self.conn.execute("SELECT id, user, host, status, started, command FROM runs").fetchall()

    def recent_runs(self, limit: int = 200) -> list[dict]:
        """The newest runs, newest first, as dicts."""
        cols = ("id", "user", "host", "site", "started", "ended", "status", "exit_code", "duration", "command")
        rows = self.conn.execute(f"SELECT {', '.join(cols)} FROM runs ORDER BY started DESC LIMIT ?", (limit,)).fetchall()
        return [dict(zip(cols, r, strict=True)) for r in rows]

    def run_io(self, run_id: str) -> tuple[list[tuple], list[tuple]]:
        """((dataset, commit, ref, site) it read, (dataset, commit) it made) of one run."""
        inputs = self.conn.execute("SELECT dataset, commit_id, ref, site FROM run_inputs WHERE run_id = ?", (run_id,)).fetchall()
        outputs = self.conn.execute("SELECT dataset, commit_id FROM run_outputs WHERE run_id = ?", (run_id,)).fetchall()
        return inputs, outputs

    def runs_of(self, commit_id: str) -> list[tuple[str, str]]:
        """(run id, "used" or "produced") of every run that read or made a commit."""
        return self.conn.execute(
            "SELECT run_id, 'used' FROM run_inputs WHERE commit_id = ? UNION SELECT run_id, 'produced' FROM run_outputs WHERE commit_id = ?",
            (commit_id, commit_id),
        ).fetchall()

    def run_inputs(self) -> list[tuple]:
        """(run id, dataset, commit id, ref, site) of every input a run read."""
        return self.conn.execute("SELECT run_id, dataset, commit_id, ref, site FROM run_inputs").fetchall()

    def run_outputs(self) -> list[tuple]:
        """(run id, dataset, commit id) of every commit a run produced."""
        return self.conn.execute("SELECT run_id, dataset, commit_id FROM run_outputs").fetchall()

    def add_restore(self, commit_id: str, dataset: str, path: str, host: str, user: str, time: str) -> bool:
        """Record a restore into ``path``; False (nothing written) if exactly that one is known."""
        if self.conn.execute(
            "SELECT 1 FROM restores WHERE commit_id = ? AND path = ? AND time = ?", (commit_id, path, time)
        ).fetchone():
            return False
        self.conn.execute(
            "INSERT INTO restores (commit_id, dataset, path, host, user, time) VALUES (?,?,?,?,?,?)",
            (commit_id, dataset, path, host, user, time),
        )
        return True

    def restores(self) -> list[tuple]:
        """(commit id, dataset, path, host, user, time) of every restore, oldest first."""
        return self.conn.execute("SELECT commit_id, dataset, path, host, user, time FROM restores ORDER BY time").fetchall()

    def commit_edges(self) -> list[tuple]:
        """(id, dataset, parents JSON, derived_from JSON, transform, created, author) of every commit."""
        return self.conn.execute("SELECT id, dataset, parents, derived_from, transform, created, author FROM commits").fetchall()

    # -- the hash cache (push and snapshot skip unchanged files) -----------------------------
    def hash_rows_from(self, path: str) -> Iterator[tuple]:
        """A cursor over (path, ino, size, mtime_ns, ctime_ns, sha256) rows from ``path`` on, in path order."""
        return self.conn.execute(
            "SELECT path, ino, size, mtime_ns, ctime_ns, sha256 FROM hash_cache WHERE path >= ? ORDER BY path", (path,)
        )

    def save_hashes(self, rows: list[tuple]) -> None:
        with self.transaction():
            self.conn.executemany(
                "INSERT OR REPLACE INTO hash_cache (path, ino, size, mtime_ns, ctime_ns, sha256) VALUES (?,?,?,?,?,?)", rows
            )

    # -- audit -------------------------------------------------------------------------------
    def audit(
        self,
        action: str,
        *,
        dataset: str | None = None,
        commit: str | None = None,
        ref: str | None = None,
        site: str | None = None,
        **details: object,
    ) -> None:
        """Append one event; each event's hash covers the previous one's (a hash chain)."""
        origin = self.origin
        with self.transaction():
            row = self.conn.execute(
                "SELECT hash, origin_seq FROM audit WHERE origin = ? ORDER BY origin_seq DESC LIMIT 1", (origin,)
            ).fetchone()
            prev, number = (row[0], row[1] + 1) if row else ("0" * 64, 1)
            event = {
                "time": now_iso(),
                "user": current_user(),
                "host": HOST,
                "action": action,
                "dataset": dataset,
                "commit": commit,
                "ref": ref,
                "site": site,
                "details": details,
            }
            digest = event_hash(prev, event)
            self.conn.execute(
                "INSERT INTO audit (time, user, host, action, dataset, commit_id, ref, site, details, prev, hash, origin, origin_seq)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    event["time"],
                    event["user"],
                    HOST,
                    action,
                    dataset,
                    commit,
                    ref,
                    site,
                    json.dumps(details, sort_keys=True),
                    prev,
                    digest,
                    origin,
                    number,
                ),
            )

    def audit_events(
        self,
        *,
        dataset: str | None = None,
        action: str | None = None,
        user: str | None = None,
        since: str | None = None,
        origin: str | None = None,
        commit: str | None = None,
    ) -> Iterator[dict]:
        """Audit events matching every given filter, oldest first (``since``: ISO time, inclusive)."""
        sql = f"SELECT {_EVENT_COLUMNS} FROM audit WHERE 1=1"
        params: list = []
        for column, value in (("dataset", dataset), ("action", action), ("user", user), ("origin", origin), ("commit_id", commit)):
            if value:
                sql += f" AND {column} = ?"
                params.append(value)
        if since:
            sql += " AND time >= ?"
            params.append(since)
        for row in self.conn.execute(sql + " ORDER BY time, seq", params):
            yield _event(row)

    def audit_page(self, *, limit: int, offset: int = 0, **filters: str | None) -> tuple[list[dict], int]:
        """One page of audit events matching ``filters`` (dataset, action, user, site), newest
        first, and how many match in all."""
        where, params = "WHERE 1=1", []
        for column, value in (("dataset", filters.get("dataset")), ("action", filters.get("action")),
                              ("user", filters.get("user")), ("site", filters.get("site"))):  # fmt: skip
            if value:
                where += f" AND {column} = ?"
                params.append(value)
        total = self.conn.execute(f"SELECT count(*) FROM audit {where}", params).fetchone()[0]
        rows = self.conn.execute(f"SELECT {_EVENT_COLUMNS} FROM audit {where} ORDER BY seq DESC LIMIT ? OFFSET ?", [*params, limit, offset])
        return [_event(r) for r in rows.fetchall()], total

    def eviction_counts(self) -> list[tuple[str, str, int]]:
        """(site, reason, count) of every eviction made from this home (the daemon's own and
        manual ones: CLI, dashboard; admission, purge); not other hosts' events imported here."""
        return self.conn.execute(
            "SELECT coalesce(site, ''), coalesce(json_extract(details, '$.reason'), ''), count(*) FROM audit"
            " WHERE action = 'evict' AND origin = ? GROUP BY 1, 2 ORDER BY 1, 2",
            (self.origin,),
        ).fetchall()

    def audit_events_after(self, seq: int) -> list[dict]:
        """Every audit event with a catalog seq above ``seq``."""
        return [_event(r) for r in self.conn.execute(f"SELECT {_EVENT_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq", (seq,)).fetchall()]

    def count_audit_events(self) -> int:
        return self.conn.execute("SELECT count(*) FROM audit").fetchone()[0]

    def unshipped_events(self, origin: str) -> list[dict]:
        """This catalog's events not yet shipped to the lake, in chain order."""
        rows = self.conn.execute(
            f"SELECT {_EVENT_COLUMNS} FROM audit WHERE origin = ? AND shipped = 0 ORDER BY origin_seq", (origin,)
        )
        return [_event(r) for r in rows]

    def mark_shipped(self, seqs: Iterable[int]) -> None:
        with self.transaction():
            self.conn.executemany("UPDATE audit SET shipped = 1 WHERE seq = ?", [(s,) for s in seqs])

    def import_events(self, events: Iterable[dict]) -> int:
        """Add shipped events (wire form) not yet here; return how many were new."""
        added = 0
        with self.transaction():
            for e in events:
                cur = self.conn.execute(
                    "INSERT OR IGNORE INTO audit (time, user, host, action, dataset, commit_id, ref, site, details, prev, hash,"
                    " origin, origin_seq, shipped) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,1)",
                    (
                        e["time"], e["user"], e["host"], e["action"], e["dataset"], e["commit"], e["ref"], e["site"],
                        json.dumps(e["details"], sort_keys=True), e["prev"], e["hash"], e["origin"], e["seq"],
                    ),
                )  # fmt: skip
                added += cur.rowcount
        return added


_EVENT_COLUMNS = "seq, time, user, host, action, dataset, commit_id, ref, site, details, origin, origin_seq, prev, hash"
_EVENT_KEYS = ("seq", "time", "user", "host", "action", "dataset", "commit", "ref", "site", "details", "origin", "origin_seq", "prev", "hash")


def _event(row: tuple) -> dict:
    event = dict(zip(_EVENT_KEYS, row, strict=True))
    event["details"] = json.loads(event["details"])
    return event


def event_hash(prev: str, event: dict) -> str:
    """The chain link: SHA-256 over the previous event's hash and this event's canonical JSON."""
    return hashlib.sha256(prev.encode() + canonical_json({k: event[k] for k in EVENT_FIELDS})).hexdigest()


class _Tx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.depth_started = False

    def __enter__(self) -> sqlite3.Connection:
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
            self.depth_started = True
        return self.conn

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self.depth_started:
            return
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")


__all__ = ["Catalog", "CachehubError"]
