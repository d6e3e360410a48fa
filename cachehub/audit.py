"""The audit trail: append-only, hash-chained, shipped to the lake, verifiable.

Each catalog appends events to its own chain (its ``origin``): every event's hash covers the
previous event's hash and the event's canonical JSON, so editing, deleting or re-ordering an
event breaks the chain at that point. Events are shipped to the lake in batches as
``audit/<origin>/<first>-<last>.jsonl`` (one JSON object per line, with ``seq``, ``prev`` and
``hash``), so the trails of several sites meet in one place and survive a catalog rebuild.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .catalog import event_hash
from .errors import ConflictError
from .lake import canonical_json

if TYPE_CHECKING:
    from .api import Hub

GENESIS = "0" * 64
EVENT_FIELDS = ("time", "user", "host", "action", "dataset", "commit", "ref", "site", "details")


@dataclass(frozen=True)
class ChainProblem:
    origin: str
    seq: int
    kind: str  # "edited" | "missing or reordered" | "broken link"
    message: str


def verify_chain(events: Iterable[dict]) -> list[ChainProblem]:
    """Check hash chains (one per origin) of events given in each origin's seq order."""
    problems: list[ChainProblem] = []
    last: dict[str, tuple[int, str]] = {}
    for event in events:
        origin = event["origin"]
        seq = event["origin_seq"]
        body = {k: event[k] for k in EVENT_FIELDS}
        prev_seq, prev_hash = last.get(origin, (0, GENESIS))
        if event_hash(event["prev"], body) != event["hash"]:
            problems.append(ChainProblem(origin, seq, "edited", f"event {origin}:{seq} ({event['action']}) was changed after it was written"))
        elif event["prev"] != prev_hash:
            kind = "missing or reordered"
            problems.append(
                ChainProblem(
                    origin,
                    seq,
                    kind,
                    f"event {origin}:{seq} ({event['action']}) does not follow event {origin}:{prev_seq}: "
                    "an event before it was deleted, or events were re-ordered",
                )
            )
        last[origin] = (seq, event["hash"])
    return problems


def ordered_for_verify(hub: Hub) -> list[dict]:
    rows = list(hub.catalog.audit_events())
    rows.sort(key=lambda e: (e["origin"], e["origin_seq"]))  # each chain in its own order
    return rows


def ship(hub: Hub) -> int:
    """Write this catalog's unshipped events to the lake as one object; return how many."""
    catalog = hub.catalog
    origin = catalog.origin
    pending = {r[0] for r in catalog.conn.execute("SELECT seq FROM audit WHERE origin = ? AND shipped = 0", (origin,))}
    if not pending:
        return 0
    rows = [e for e in catalog.audit_events(origin=origin) if e["seq"] in pending]
    if not rows:
        return 0
    rows.sort(key=lambda e: e["origin_seq"])
    lines = b"".join(canonical_json(_wire(e)) + b"\n" for e in rows)
    key = f"audit/{origin}/{rows[0]['origin_seq']:012d}-{rows[-1]['origin_seq']:012d}.jsonl"
    try:
        hub.lake.backend.write(key, lines, if_none_match=True)  # never overwrite shipped history
    except ConflictError:
        raise ConflictError(
            f"the lake already holds audit events {key}: this catalog's trail diverged from what it shipped "
            "(were events deleted?); run cachehub audit verify",
            key=key,
        ) from None
    with catalog.transaction():
        catalog.conn.executemany("UPDATE audit SET shipped = 1 WHERE seq = ?", [(e["seq"],) for e in rows])
    return len(rows)


def _wire(event: dict) -> dict:
    return {**{k: event[k] for k in EVENT_FIELDS}, "origin": event["origin"], "seq": event["origin_seq"], "prev": event["prev"], "hash": event["hash"]}


def import_from_lake(hub: Hub) -> int:
    """Load every origin's shipped events from the lake into the catalog (idempotent)."""
    backend = hub.lake.backend
    added = 0
    keys = sorted(k for k in backend.list("audit/") if k.endswith(".jsonl"))
    with hub.catalog.transaction():
        for key in keys:
            data, _ = backend.read(key)
            for line in data.splitlines():
                if not line.strip():
                    continue
                e = json.loads(line)
                cur = hub.catalog.conn.execute(
                    "INSERT OR IGNORE INTO audit (time, user, host, action, dataset, commit_id, ref, site, details, prev, hash,"
                    " origin, origin_seq, shipped) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,1)",
                    (
                        e["time"], e["user"], e["host"], e["action"], e["dataset"], e["commit"], e["ref"], e["site"],
                        json.dumps(e["details"], sort_keys=True), e["prev"], e["hash"], e["origin"], e["seq"],
                    ),
                )  # fmt: skip
                added += cur.rowcount
    return added
