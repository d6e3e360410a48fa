"""The catalog's index of the lake: refresh a dataset, resolve a ref, rebuild everything.

The lake is the system of record; the catalog is an index of it that any host can rebuild.
``refresh`` reads one dataset's commits (only those the catalog lacks), tags and tombstones;
``resolve_commit`` answers ``NAME@REF`` from the catalog, refreshing once when it does not
know the answer; ``rebuild`` re-reads the whole lake and the site roots.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC

from .context import Context
from .errors import AmbiguousRefError, CachehubError, DatasetNotFoundError, RefNotFoundError
from .model import Commit, Tag, Tombstone
from .refs import LATEST, Ref, validate_dataset_name
from .store import scan_site_entries


def refresh(ctx: Context, dataset: str) -> bool:
    """Index a dataset's commits and tags from the lake; False if the lake has no such dataset.

    Only commits the catalog does not know are read. A damaged commit document is skipped
    (and reported by ``catalog rebuild``) rather than hiding the whole dataset.
    """
    validate_dataset_name(dataset)
    catalog = ctx.catalog
    commits, tags, _problems = read_dataset(ctx, dataset, known=catalog.commit)
    tombstones = ctx.lake.tombstones(dataset)
    if commits is None and not tombstones:
        return False
    with catalog.transaction():
        catalog.add_commits(commits or [])
        catalog.replace_tags(dataset, tags)
        for t in tombstones:
            catalog.add_tombstone(t)
        if commits is not None:
            catalog.touch_dataset(dataset)
    return commits is not None


def read_dataset(
    ctx: Context, dataset: str, known: Callable[[str], object] | None = None
) -> tuple[list[Commit] | None, list[Tag], list[str]]:
    """(commits not ``known``, tags, problems) of a dataset in the lake; commits None if it has none."""
    lake = ctx.lake
    ids = lake.commit_ids(dataset)
    if not ids:
        return None, [], []
    commits, problems = [], []
    damaged: list[CachehubError] = []
    for cid in ids:
        if known is not None and known(cid) is not None:
            continue
        try:
            commits.append(lake.read_commit(dataset, cid))
        except CachehubError as exc:
            problems.append(f"{dataset}/commits/{cid}: {exc}")
            ctx.lake_problems[(dataset, cid)] = exc  # what resolving that commit will report
    tags = lake.tags(dataset, damaged)
    for exc in damaged:
        problems.append(str(exc))
        ctx.lake_problems[(dataset, getattr(exc, "key", "").rsplit("/", 1)[-1].removesuffix(".json"))] = exc
    return commits, tags, problems


def resolve_commit(ctx: Context, ref: str | Ref, *, refresh_first: bool = False, max_age: float | None = None) -> Commit:
    """The commit a ``name@ref`` names; distinct errors for unknown dataset, ref, ambiguity.

    ``max_age``: a tag (or ``latest``) the catalog read from the lake longer ago than this many
    seconds is read again first, so the answer is never staler than that (commit ids never move).
    """
    parsed = Ref.of(ref)
    catalog = ctx.catalog
    fresh = refresh_first or (max_age is not None and _stale(ctx, parsed, max_age))
    if fresh or not catalog.has_dataset(parsed.dataset):
        if not refresh(ctx, parsed.dataset) and not catalog.has_dataset(parsed.dataset):
            known = catalog.dataset_names()
            hint = f"known datasets: {', '.join(known[:10])}" if known else "the catalog is empty"
            raise DatasetNotFoundError(
                f"unknown dataset {parsed.dataset!r} ({hint}); publish it with: cachehub push DIR {parsed.dataset}",
                dataset=parsed.dataset,
            )
        fresh = True  # just refreshed
    found = _lookup(ctx, parsed)
    if found is None and not fresh:
        refresh(ctx, parsed.dataset)
        found = _lookup(ctx, parsed)
    if found is None:
        _refuse_purged(ctx, parsed)
        _refuse_damaged(ctx, parsed)
        tags = [t.name for t in catalog.tags(parsed.dataset)]
        hint = f"tags: {', '.join(tags[:10])}" if tags else "no tags yet"
        raise RefNotFoundError(
            f"{parsed.dataset} has no tag or commit {parsed.ref!r} ({hint}); see: cachehub log {parsed.dataset}",
            dataset=parsed.dataset,
            ref=parsed.ref,
        )
    return found


def lookup_local(ctx: Context, ref: str | Ref) -> Commit | None:
    """What the catalog alone says ``ref`` names (no lake access), or None."""
    return _lookup(ctx, Ref.of(ref))


def _stale(ctx: Context, parsed: Ref, max_age: float) -> bool:
    """Is what the catalog knows of ``parsed``'s tags older than ``max_age`` seconds?"""
    if parsed.is_full_id:
        return False
    when = ctx.catalog.refreshed(parsed.dataset)
    if when is None:
        return True
    from datetime import datetime

    age = ctx.now() - datetime.strptime(when, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    return age > max_age and (parsed.ref == LATEST or not parsed.could_be_commit or ctx.catalog.tag(parsed.dataset, parsed.ref) is not None)


def purged(ctx: Context, parsed: Ref) -> Tombstone | None:
    """The tombstone of the purged commit ``parsed`` names by id, if it was purged."""
    return ctx.catalog.tombstone(parsed.dataset, parsed.ref) if parsed.could_be_commit else None


def _refuse_purged(ctx: Context, parsed: Ref) -> None:
    t = purged(ctx, parsed)
    if t is not None:
        raise RefNotFoundError(
            f"{parsed.dataset}@{t.commit[:12]} was purged on {t.purged} by {t.purged_by} (reason: {t.reason}); it cannot be resolved",
            dataset=parsed.dataset,
            ref=parsed.ref,
        )


def _refuse_damaged(ctx: Context, parsed: Ref) -> None:
    """If ``parsed`` names a tag or commit whose document in the lake is damaged, say that (with
    its key, exit code and fix) rather than that it does not exist."""
    found = ctx.lake_problems.get((parsed.dataset, parsed.ref))
    tagged = ctx.catalog.tag(parsed.dataset, parsed.ref) if found is None else None
    if tagged is not None:  # a good tag naming a damaged commit
        found = ctx.lake_problems.get((parsed.dataset, tagged[0]))
    if found is None and parsed.could_be_commit:
        found = next((e for (ds, name), e in ctx.lake_problems.items() if ds == parsed.dataset and name.startswith(parsed.ref)), None)
    if found is not None:
        raise found


def _lookup(ctx: Context, parsed: Ref) -> Commit | None:
    catalog = ctx.catalog
    if parsed.ref == LATEST:
        return catalog.latest(parsed.dataset)
    tagged = catalog.tag(parsed.dataset, parsed.ref)
    if tagged is not None:
        return catalog.commit(tagged[0])
    if parsed.could_be_commit:
        matches = catalog.commits_with_prefix(parsed.dataset, parsed.ref)
        if len(matches) > 1:
            raise AmbiguousRefError(
                f"{parsed} matches {len(matches)} commits ({', '.join(c.short for c in matches[:5])}); "
                "give more characters of the commit id",
                dataset=parsed.dataset,
                ref=parsed.ref,
            )
        if matches:
            return matches[0]
    return None


def rebuild(ctx: Context) -> dict[str, object]:
    """Rebuild the index from the lake alone (and the site roots); the audit trail is kept.

    The lake is read completely before the catalog is touched, so a lake that cannot be
    read leaves the old catalog as it was.
    """
    from . import audit
    from .config import lake_identity

    lake = ctx.lake
    lake.check_readable()
    catalog = ctx.open_catalog(any_lake=True)
    found: list[tuple[str, list[Commit], list[Tag]]] = []
    problems: list[str] = []
    tombstones: list[Tombstone] = []
    for name in lake.datasets():
        commits, tags, bad = read_dataset(ctx, name)
        problems += bad
        tombstones += lake.tombstones(name)
        if commits:
            found.append((name, commits, tags))
    runs = lake.runs()
    entries = scan_site_entries(ctx.settings.sites.values())
    with catalog.transaction():
        catalog.clear_index()
        for name, commits, tags in found:
            catalog.add_commits(commits)
            catalog.replace_tags(name, tags)
            catalog.touch_dataset(name)
        for t in tombstones:
            catalog.add_tombstone(t)
        for entry in entries:
            catalog.add_cache_entry(entry)
        catalog.set_meta("lake", lake_identity(ctx.settings.lake_url))
    imported = audit.import_from_lake(ctx)
    _index_provenance(ctx, runs)
    counts: dict[str, object] = {
        "datasets": len(found),
        "commits": sum(len(c) for _, c, _ in found),
        "tags": sum(len(t) for _, _, t in found),
        "cache_entries": len(entries),
    }
    counts["audit_events_imported"] = imported
    counts["runs"] = len(runs)
    ctx.events.audit("catalog-rebuild", problems=len(problems), **counts)
    counts["problems"] = problems
    return counts


def _index_provenance(ctx: Context, runs: list[dict]) -> None:
    """Runs from the lake, then run inputs and restores carried by audit events."""
    from .model import RunRecord

    fields = set(RunRecord.__dataclass_fields__)
    catalog = ctx.catalog
    with catalog.transaction():
        for doc in runs:
            record = RunRecord(**{k: v for k, v in doc.items() if k in fields})
            catalog.save_run({**record.__dict__, "inputs": [], "outputs": []})
            for i in record.inputs:
                catalog.add_run_input(record.id, i["dataset"], i["commit"], i.get("ref"), i.get("site"), record.started)
        for e in catalog.audit_events():
            run = e["details"].get("run")
            if e["action"] in ("resolve", "use") and run and e["commit"]:
                catalog.open_run(run, user=e["user"], host=e["host"], site=e["site"], started=e["time"], origin="audit")
                catalog.add_run_input(run, e["dataset"], e["commit"], e["ref"], e["site"], e["time"])
            elif e["action"] == "restore":
                catalog.add_restore(e["commit"], e["dataset"], e["details"].get("path"), e["host"], e["user"], e["time"])
