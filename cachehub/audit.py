"""The audit trail: append-only, hash-chained, shipped to the lake, verifiable.

Each catalog appends events to its own chain (its ``origin``): every event's hash covers the
previous event's hash and the event's canonical JSON, so editing, deleting or re-ordering an
event breaks the chain at that point. Events are shipped to the lake in batches as
``audit/<origin>/<first>-<last>.jsonl`` (one JSON object per line, with ``seq``, ``prev`` and
``hash``), so the trails of several sites meet in one place and survive a catalog rebuild.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from .catalog import event_hash
from .context import Context
from .errors import CachehubError, ConflictError
from . import pause
from .lake import audit_batch_key

log = logging.getLogger("cachehub")
GENESIS = "0" * 64


@dataclass(frozen=True)
class ChainProblem:
    origin: str
    seq: int
    kind: str  # "edited" | "missing or reordered" | "broken link"
    message: str


def verify_chain(events: Iterable[dict], last: dict[str, tuple[int, str]] | None = None) -> list[ChainProblem]:
    """Check hash chains (one per origin) of events given in each origin's seq order.

    ``last`` (origin -> (seq, hash) of the last event already checked) continues a check
    made before, and is updated in place."""
    problems: list[ChainProblem] = []
    last = {} if last is None else last
    for event in events:
        origin = event["origin"]
        seq = event["origin_seq"]
        prev_seq, prev_hash = last.get(origin, (0, GENESIS))
        if event_hash(event["prev"], event) != event["hash"]:
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


def verify(ctx: Context) -> list[ChainProblem]:
    """Check every hash chain in the catalog; an empty list means intact."""
    rows = list(ctx.catalog.audit_events())
    rows.sort(key=lambda e: (e["origin"], e["origin_seq"]))  # each chain in its own order
    return verify_chain(rows)


def verify_since(ctx: Context, after_seq: int, last: dict[str, tuple[int, str]]) -> tuple[list[ChainProblem], int]:
    """Check the events added since catalog seq ``after_seq`` against the chain state ``last``
    (updated in place); returns the problems and the newest seq checked."""
    rows = ctx.catalog.audit_events_after(after_seq)
    newest = max((e["seq"] for e in rows), default=after_seq)
    rows.sort(key=lambda e: (e["origin"], e["origin_seq"]))
    return verify_chain(rows, last), newest


def ship(ctx: Context) -> int:
    """Write this catalog's unshipped events to the lake as one object; return how many.

    Shippers of one catalog (the CLI and the daemon sharing a home) take turns: one holds
    ``<home>/audit-ship.lock`` (flock: the home is local disk) from reading the pending events
    to marking them shipped; another finding it held returns at once (those events go with that
    ship, or the next). A batch already in the lake with exactly these bytes (a ship that died
    before marking) is taken as shipped; only different bytes under the same key are a diverged
    trail.
    """
    import fcntl

    catalog = ctx.catalog
    origin = catalog.origin
    lock_path = ctx.settings.home / "audit-ship.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # another process of this home is shipping right now
        rows = catalog.unshipped_events(origin)
        if not rows:
            return 0
        pause.point("audit.ship.before-write")
        try:
            ctx.lake.write_audit_batch(origin, rows)  # create-only: never overwrite shipped history
        except ConflictError:
            if not ctx.lake.audit_batch_matches(origin, rows):
                key = audit_batch_key(origin, rows[0]["origin_seq"], rows[-1]["origin_seq"])
                raise ConflictError(
                    f"the lake already holds other audit events under {key}: this catalog's trail diverged from what it "
                    "shipped (were events deleted?); run cachehub audit verify",
                    key=key,
                ) from None
        catalog.mark_shipped(e["seq"] for e in rows)
        return len(rows)


def ship_quietly(ctx: Context) -> int:
    """``ship``, but a lake that cannot be reached now is retried later (a warning, not an error)."""
    try:
        return ship(ctx)
    except (CachehubError, OSError) as exc:
        log.warning("audit events not shipped to the lake yet: %s", exc)
        return 0


def import_from_lake(ctx: Context) -> int:
    """Load every origin's shipped events from the lake into the catalog (idempotent)."""
    return ctx.catalog.import_events(ctx.lake.audit_events())
