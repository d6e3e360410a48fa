"""The ``cachehub`` command: parse, call one library method, format. No logic lives here.

Library errors become one line on stderr and the error's exit code (docs/cli.md lists them);
``CACHEHUB_DEBUG=1`` shows the traceback instead. Every listing takes ``--json``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from cachehub.api import Hub

def _typer(**options: Any) -> typer.Typer:
    """A command group with click's plain help: typer's rich help renderer imports ~95 ms."""
    return typer.Typer(rich_markup_mode=None, **options)


app = _typer(
    name="cachehub",
    help="Cache and version ML datasets: an S3 data lake of immutable commits, delta copies to site caches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
site_app = _typer(help="Manage sites: cache roots near compute.", no_args_is_help=True)
catalog_app = _typer(help="Manage the local catalog (an index of the lake).", no_args_is_help=True)
audit_app = _typer(help="The audit trail: who did what, when, where.", invoke_without_command=True)
lake_app = _typer(help="Check the lake itself.", no_args_is_help=True)
app.add_typer(site_app, name="site")
app.add_typer(catalog_app, name="catalog")
app.add_typer(audit_app, name="audit")
app.add_typer(lake_app, name="lake")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
SiteOpt = Annotated[Optional[str], typer.Option("--site", "-s", help="Site name (default: CACHEHUB_SITE or the configured default, 'local').")]  # noqa: UP007
IncludeOpt = Annotated[Optional[list[str]], typer.Option("--include", help="Only files matching this glob (repeatable): a partial cache, e.g. 'train/**'.")]  # noqa: UP007
ExcludeOpt = Annotated[Optional[list[str]], typer.Option("--exclude", help="Leave out files matching this glob (repeatable), e.g. '*.tmp'.")]  # noqa: UP007
TokenOpt = Annotated[Optional[str], typer.Option("--token-file", help="File whose first line is the token that actions (and pages, off loopback) need.")]  # noqa: UP007
JobsOpt = Annotated[Optional[int], typer.Option("--jobs", "-j", help="Transfers in flight (default: CACHEHUB_JOBS or config, else 64).")]  # noqa: UP007


_OPENED: list[Hub] = []  # closed by main() before the process exits


def _hub() -> Hub:
    from cachehub.api import Hub

    hub = Hub()
    _OPENED.append(hub)
    return hub


def _emit(value: Any) -> None:
    from cachehub.model import to_dict

    def conv(v: Any) -> Any:
        if hasattr(v, "__dataclass_fields__"):
            return to_dict(v)
        return v

    if isinstance(value, list):
        value = [conv(v) for v in value]
    typer.echo(json.dumps(conv(value), indent=2, default=str))


def _listing(rows: list, json_out: bool, empty: str, line: Any) -> None:
    """Print a listing: JSON, or one formatted line per row (``empty`` when there are none)."""
    if json_out:
        _emit(rows)
        return
    if not rows:
        typer.echo(empty)
    for row in rows:
        typer.echo(line(row))


_QUIET: list[bool] = [False]


def _progress(enabled: bool) -> Any:
    """A bar on a terminal; off one (Kubernetes logs, CI), a plain line every few seconds
    (CACHEHUB_PROGRESS_EVERY, default 5 s); nothing with --quiet or --json."""
    from cachehub.progress import NULL, LineProgress

    mode = os.environ.get("CACHEHUB_PROGRESS", "auto")
    if not enabled or _QUIET[0] or mode == "off":
        return NULL
    if mode == "lines" or (mode == "auto" and not sys.stderr.isatty()):
        return LineProgress(every=float(os.environ.get("CACHEHUB_PROGRESS_EVERY", "5")))
    from .progress import RichProgress

    return RichProgress()


@app.callback()
def _options(quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output (results and errors still print).")] = False) -> None:
    """Cache and version ML datasets: an object-store lake of immutable commits, delta copies to site caches."""
    _QUIET[0] = quiet


def _size(n: int | None) -> str:
    from cachehub.fsutil import human_bytes

    return "-" if n is None else human_bytes(n)


# -- setup ---------------------------------------------------------------------------------
@app.command()
def init(
    lake: Annotated[Optional[str], typer.Option(help="Lake URL: a directory, file:///path, s3://BUCKET/PREFIX, az://CONTAINER/PREFIX or gs://BUCKET/PREFIX.")] = None,  # noqa: UP007
    endpoint_url: Annotated[Optional[str], typer.Option(help="Object-store endpoint: a non-AWS S3 server, an Azure emulator or private endpoint, a GCS endpoint.")] = None,  # noqa: UP007
    region: Annotated[Optional[str], typer.Option(help="S3 region.")] = None,  # noqa: UP007
    json_out: JsonOpt = False,
) -> None:
    """Write the configuration and create the catalog (defaults: local lake, site 'local').

    Also runs `cachehub doctor` against the lake and records what its server guarantees.
    """
    from cachehub.api import init

    result = init(lake=lake, endpoint_url=endpoint_url, region=region)
    if json_out:
        _emit(result)
    else:
        typer.echo(f"config  {result.config}\ncatalog {result.catalog}\nlake    {result.lake}")
        typer.echo(f"site    {result.site} -> {result.site_root}")
    for gap in result.server_gaps:
        typer.echo(f"warning: the lake's server: {gap} (see `cachehub doctor`)", err=True)


@lake_app.command("verify")
def lake_verify(
    dataset: Annotated[Optional[list[str]], typer.Option("--dataset", "-d", help="Only this dataset (repeatable; default: all).")] = None,  # noqa: UP007
    sample: Annotated[Optional[float], typer.Option(help="Check a random fraction of the objects, e.g. 0.01 (default: all).")] = None,  # noqa: UP007
    restart: Annotated[bool, typer.Option("--restart", help="Start over instead of resuming an interrupted run.")] = False,
    jobs: JobsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Read the lake back: commit and tag documents, manifests, objects and chunk maps, hashed.

    Resumes an interrupted run with the same options. Exits 9 if anything is missing or damaged.
    """
    from cachehub.fsutil import human_bytes

    result = _hub().verify_lake(datasets=dataset, sample=sample, restart=restart, jobs=jobs, progress=_progress(not json_out))
    if json_out:
        _emit(result)
    else:
        if result.resumed_from:
            typer.echo(f"resumed after {result.resumed_from} objects checked by an interrupted run")
        share = f" (a {result.sample:g} sample)" if result.sample else ""
        typer.echo(
            f"{len(result.datasets)} datasets, {result.commits} commits, {result.manifests} manifests; "
            f"{result.checked_objects} of {result.objects} objects checked{share}, {human_bytes(result.checked_bytes)}"
        )
        for problem in result.problems:
            typer.echo(f"problem: {problem.key}: {problem.what}" + (f"; fix: {problem.fix}" if problem.fix else ""))
        typer.echo("lake ok" if result.ok else f"{len(result.problems)} problems")
    if not result.ok:
        raise typer.Exit(9)


@app.command()
def doctor(json_out: JsonOpt = False) -> None:
    """Check what the lake's server guarantees and record it in the lake marker.

    Exits 0 when every guarantee holds, 20 when one is degraded (worked around) or missing
    (operations that need it are refused); each line names the gap and what it affects.
    """
    report = _hub().doctor()
    if json_out:
        _emit(report)
    else:
        typer.echo(f"lake {report.lake}")
        for check in report.checks:
            typer.echo(f"{check.state:<9} {check.name:<15} {check.detail}")
            if check.affects:
                typer.echo(f"{'':<25} -> {check.affects}")
    if not report.ok:
        raise typer.Exit(20)


# -- publishing ------------------------------------------------------------------------------
@app.command()
def push(
    directory: Annotated[str, typer.Argument(help="Directory to publish.")],
    dataset: Annotated[str, typer.Argument(help="Dataset name, e.g. chest-xray.")],
    message: Annotated[str, typer.Option("--message", "-m", help="Commit message.")] = "",
    tag: Annotated[Optional[str], typer.Option(help="Tag the new commit, e.g. v3.")] = None,  # noqa: UP007
    parent: Annotated[Optional[str], typer.Option(help="Parent commit (default: the dataset's latest).")] = None,  # noqa: UP007
    derived_from: Annotated[Optional[list[str]], typer.Option("--derived-from", help="Input dataset@ref this was made from (repeatable).")] = None,  # noqa: UP007
    transform: Annotated[Optional[str], typer.Option(help="What made it, e.g. resize.py@<git sha>.")] = None,  # noqa: UP007
    force: Annotated[bool, typer.Option("--force", help="Move --tag if it exists.")] = False,
    repair: Annotated[bool, typer.Option("--repair", help="Read back every object from the lake; upload again those missing or damaged.")] = False,
    jobs: JobsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Publish DIRECTORY as a new commit of DATASET, uploading only content the lake lacks."""
    with _hub() as hub:
        result = hub.push(
            directory,
            dataset,
            message=message,
            tag=tag,
            parent=parent,
            derived_from=tuple(derived_from or ()),
            transform=transform,
            force=force,
            jobs=jobs,
            progress=_progress(not json_out),
            repair=repair,
        )
    if json_out:
        _emit(result)
        return
    if repair:
        typer.echo(f"checked every object of {dataset} in the lake: {result.repaired_files} missing or damaged, uploaded again", err=True)
    if not result.created:
        typer.echo(f"{dataset}: nothing changed since {result.commit[:12]}; no commit created, nothing uploaded")  # type: ignore[index]
        if result.tag:
            typer.echo(f"tagged {dataset}@{result.tag} -> {result.commit[:12]}")  # type: ignore[index]
        return
    tag_note = f" tagged {result.tag}" if result.tag else ""
    typer.echo(
        f"{dataset}@{result.commit[:12]}{tag_note}: {result.files} files ({_size(result.bytes)}), "  # type: ignore[index]
        f"uploaded {result.uploaded_files} ({_size(result.uploaded_bytes)}), "
        f"already in lake {result.present_files} ({_size(result.present_bytes)}) in {result.seconds:.1f}s"
    )


@app.command()
def tag(
    ref: Annotated[str, typer.Argument(help="Commit to tag: NAME@<commit id prefix> or NAME@TAG.")],
    name: Annotated[str, typer.Argument(help="Tag name, e.g. v3.")],
    force: Annotated[bool, typer.Option("--force", help="Move the tag if it points elsewhere.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Point tag NAME at a commit (compare-and-swap in the lake)."""
    with _hub() as hub:
        result = hub.tag(ref, name, force=force)
    if json_out:
        _emit(result)
    else:
        typer.echo(f"{result.dataset}@{result.name} -> {result.commit[:12]}")


# -- browsing --------------------------------------------------------------------------------
@app.command()
def datasets(json_out: JsonOpt = False) -> None:
    """List datasets with their commit count, newest commit and tags."""
    with _hub() as hub:
        rows = hub.datasets()
    _listing(
        rows,
        json_out,
        "no datasets yet; publish one with: cachehub push DIR NAME",
        lambda d: f"{d.name:30} {d.commits:5} commits  latest {(d.latest or '')[:12]}  {d.latest_created or ''}  tags {','.join(d.tags) or '-'}",
    )


@app.command()
def log(
    dataset: Annotated[str, typer.Argument(help="Dataset name.")],
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", help="Show at most N commits.")] = None,  # noqa: UP007
    json_out: JsonOpt = False,
) -> None:
    """List a dataset's commits, newest first."""
    with _hub() as hub:
        commits = hub.log(dataset, limit=limit)
    if json_out:
        _emit(commits)
        return
    for c in commits:
        tags = f" ({', '.join(c.tags)})" if c.tags else ""
        typer.echo(f"{c.short}{tags}  {c.created}  {c.author}  {c.files} files {_size(c.bytes)}  {c.message}")


@app.command()
def show(ref: Annotated[str, typer.Argument(help="NAME@REF")], json_out: JsonOpt = False) -> None:
    """Show one commit: metadata, size, file count, parents, tags."""
    with _hub() as hub:
        c = hub.show(ref)
    if json_out:
        body = {"commit": c.id}
        from cachehub.model import to_dict

        body.update({k: v for k, v in to_dict(c).items() if k != "id"})
        _emit(body)
        return
    typer.echo(f"commit   {c.id}\ndataset  {c.dataset}\ntags     {', '.join(c.tags) or '-'}")
    typer.echo(f"created  {c.created} by {c.author}@{c.host}\nfiles    {c.files}\nsize     {_size(c.bytes)} ({c.bytes} bytes)")
    typer.echo(f"parents  {', '.join(p[:12] for p in c.parents) or '-'}\nmanifest {c.manifest}")
    if c.derived_from:
        typer.echo(f"derived  {', '.join(p[:12] for p in c.derived_from)}  transform {c.transform or '-'}")
    typer.echo(f"message  {c.message}")


@app.command()
def ls(
    ref: Annotated[str, typer.Argument(help="NAME@REF")],
    subpath: Annotated[str, typer.Argument(help="Only files under this path.")] = "",
    long: Annotated[bool, typer.Option("--long", "-l", help="Show size and hash.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """List the files of a commit."""
    with _hub() as hub:
        entries = hub.ls(ref, subpath)
        if json_out:
            _emit(list(entries))
            return
        for e in entries:
            typer.echo(f"{e.size:>12} {e.sha256[:12]}  {e.path}" if long else e.path)


@app.command()
def diff(
    old: Annotated[str, typer.Argument(help="NAME@REF (before)")],
    new: Annotated[str, typer.Argument(help="NAME@REF (after)")],
    stat: Annotated[bool, typer.Option("--stat", help="Only counts and bytes.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Show files added, removed and modified between two commits."""
    from cachehub import diff as diffmod

    with _hub() as hub:
        changes = hub.diff(old, new)
        if stat:
            s = diffmod.stat(changes)
            if json_out:
                _emit(s)
            else:
                typer.echo(
                    f"{s.added} added ({_size(s.added_bytes)}), {s.removed} removed ({_size(s.removed_bytes)}), "
                    f"{s.modified} modified ({_size(s.modified_bytes)})"
                )
            return
        if json_out:
            _emit(list(changes))
            return
        mark = {"added": "+", "removed": "-", "modified": "M"}
        for ch in changes:
            sizes = _size(ch.new_size) if ch.change == "added" else _size(ch.old_size) if ch.change == "removed" else f"{_size(ch.old_size)} -> {_size(ch.new_size)}"
            typer.echo(f"{mark[ch.change]} {ch.path}  {sizes}")


# -- caching ---------------------------------------------------------------------------------
@app.command()
def cache(
    ref: Annotated[str, typer.Argument(help="NAME@REF to cache.")],
    site: SiteOpt = None,
    jobs: JobsOpt = None,
    run_async: Annotated[bool, typer.Option("--async", help="Queue the request for the site's daemon and return (with --wait: and wait).")] = False,
    shard: Annotated[
        Optional[str],  # noqa: UP007
        typer.Option(
            help="Fetch only shard K/N of what the site lacks (K from 0); the shard that completes the commit publishes it. "
            "Default: from a Kubernetes Indexed Job (JOB_COMPLETION_INDEX with CACHEHUB_SHARDS) or a Slurm array.",
        ),
    ] = None,
    no_shard: Annotated[bool, typer.Option("--no-shard", help="Cache the whole commit even inside an Indexed Job or a Slurm array.")] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until the commit is cached at the site by anyone; alone, fetch nothing (for init containers).")
    ] = False,
    timeout: Annotated[str, typer.Option(help="With --wait: give up after this long (30s, 10m, 6h, 1d), exit 3.")] = "1d",
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Materialise a commit at a site, fetching only content the site lacks; print its path.

    With --shard K/N (or inside an Indexed Job or Slurm array) fetch 1/N of it, many hosts at
    once; with --wait wait for whoever caches it.
    """
    from cachehub.policy import parse_duration
    from cachehub.shard import Shard

    limit = parse_duration(timeout)
    part = None if no_shard else Shard.parse(shard) if shard is not None else Shard.from_env()
    if part is not None and run_async:
        raise typer.BadParameter("--shard and --async do not go together: a shard fetches here, --async asks the daemon")
    if (include or exclude) and (part is not None or run_async or wait):
        raise typer.BadParameter("--include/--exclude make a partial cache here: not with --shard, --async or --wait (yet)")
    if part is not None and part.source != "--shard" and not json_out:
        typer.echo(f"cachehub: shard {part} (from {part.source}); --no-shard caches the whole commit", err=True)
    with _hub() as hub:
        if run_async or (wait and part is None):
            request = hub.cache_async(ref, site=site) if run_async else None
            if not wait:
                if json_out:
                    _emit({"request": str(request), "ref": ref})
                else:
                    typer.echo(f"queued {ref} for the daemon: {request}")
                return
            if not json_out:
                typer.echo(f"waiting for {ref} to be cached at {site or hub.settings.default_site} (up to {timeout})", err=True)
            where = hub.wait(ref, site=site, timeout=limit, request=request, report=lambda line: typer.echo(line, err=True))
            _emit({"ref": ref, "path": str(where), "waited": True}) if json_out else typer.echo(str(where))
            return
        if part is not None:
            _cache_shard(hub, ref, part, site=site, jobs=jobs, wait=wait, limit=limit, json_out=json_out)
            return
        r = hub.cache(ref, site=site, jobs=jobs, progress=_progress(not json_out), include=include, exclude=exclude)
    if json_out:
        _emit(r)
        return
    for entry in r.evicted:
        typer.echo(f"evicted {entry[: entry.index('@') + 13]} to make room", err=True)
    if r.already_cached:
        typer.echo(f"{r.dataset}@{r.commit[:12]} already cached at {r.site}; nothing fetched", err=True)
    else:
        rate = r.fetched_bytes / r.seconds if r.seconds else 0
        typer.echo(
            f"{r.dataset}@{r.commit[:12]} cached at {r.site}: fetched {r.fetched_files} objects ({_size(r.fetched_bytes)}), "
            f"reused {r.reused_files} files ({_size(r.reused_bytes)}) in {r.seconds:.1f}s ({_size(rate)}/s)",
            err=True,
        )
        if r.chunk_copied_bytes:
            typer.echo(
                f"  of the fetched bytes, {_size(r.chunk_copied_bytes)} were unchanged chunks copied from older versions "
                f"at the site; {_size(r.fetched_bytes - r.chunk_copied_bytes)} crossed the network",
                err=True,
            )
    typer.echo(r.path)


def _cache_shard(hub: Hub, ref: str, part: Any, *, site: str | None, jobs: int | None, wait: bool, limit: float, json_out: bool) -> None:
    """One shard of a sharded cache; with ``wait``, then wait until the commit is published."""
    r = hub.cache_shard(ref, part, site=site, jobs=jobs, progress=_progress(not json_out))
    path = r.path
    if path is None and wait:
        if not json_out:
            typer.echo(f"shard {r.shard} done; waiting for the other shards to complete {r.dataset}@{r.commit[:12]}", err=True)
        path = str(hub.wait(f"{r.dataset}@{r.commit}", site=site, timeout=limit, report=lambda line: typer.echo(line, err=True)))
    if json_out:
        _emit({**dict(r), "path": path, "published": path is not None})
        return
    rate = r.fetched_bytes / r.seconds if r.seconds else 0
    typer.echo(
        f"shard {r.shard} of {r.dataset}@{r.commit[:12]} at {r.site}: fetched {r.fetched_files} objects and "
        f"{r.fetched_pieces} pieces of large ones ({_size(r.fetched_bytes)}) in {r.seconds:.1f}s ({_size(rate)}/s)",
        err=True,
    )
    if r.published_here:
        typer.echo(f"every object is at {r.site}: this shard published {r.dataset}@{r.commit[:12]}", err=True)
    elif path is None:
        typer.echo(
            f"not published yet: other shards still fetch (e.g. {r.waiting_for}); the last shard publishes it, "
            f"or run `cachehub cache {r.dataset}@{r.commit[:12]}` (or --wait) afterwards",
            err=True,
        )
    if path is not None:
        typer.echo(path)


@app.command()
def path(ref: Annotated[str, typer.Argument(help="NAME@REF")], site: SiteOpt = None, include: IncludeOpt = None, exclude: ExcludeOpt = None) -> None:
    """Print the local path of a cached commit, or of a partial cache with --include/--exclude (exit 3 if not cached)."""
    with _hub() as hub:
        typer.echo(str(hub.resolve(ref, site=site, include=include, exclude=exclude)))


@app.command()
def status(
    site: Annotated[Optional[str], typer.Option("--site", "-s", help="Only this site (default: every site).")] = None,  # noqa: UP007
    json_out: JsonOpt = False,
) -> None:
    """Per site: cached commits, their sizes, shared bytes, filesystem space."""
    with _hub() as hub:
        rows = hub.status(site)
    if json_out:
        _emit(rows)
        return
    for s in rows:
        if s.state == "missing":
            typer.echo(f"site {s.site}  {s.root}  MISSING: no cachehub-site.json there (is the export mounted?)")
            continue
        typer.echo(f"site {s.site}  {s.root}  link={s.link}  fs free {_size(s.fs_free)} of {_size(s.fs_total)}")
        typer.echo(
            f"  {len(s.commits)} commits, {_size(s.logical_bytes)} as seen by readers, "
            f"{_size(s.object_bytes)} on disk ({_size(s.shared_bytes)} shared)"
        )
        quota = f"quota {_size(s.quota)}" if s.quota else "no quota"
        typer.echo(f"  {quota}, {s.leases} live leases, {s.pinned} pinned, {s.queue_depth} queued requests")
        d = s.daemon
        typer.echo(f"  daemon: pid {d.pid} on {d.host}, http {d.listen or 'off'}" if d else "  daemon: not running")
        for c in s.commits:
            part = ""
            if c.selection:
                from cachehub.select import Selection

                part = f"  partial: {Selection.from_json(c.selection).describe()}"
            typer.echo(f"  {c.dataset}@{c.commit[:12]}  {c.files} files  {_size(c.bytes)}  last used {c.last_used or '-'}{part}")
        for p in s.partial:
            state = "running" if p.running else f"interrupted, kept until {p.expires}: re-run cachehub cache to resume"
            typer.echo(f"  partial {p.dataset}@{p.commit[:12]} from {p.host}, started {p.started} ({state})")
        if d and d.listen:
            metrics = _daemon_metrics(d.listen)
            if metrics:
                ratio = metrics.get("hit_ratio")
                typer.echo(
                    f"  daemon metrics: fetched {_size(metrics['fetched_bytes'])}, reused {_size(metrics['reused_bytes'])}"
                    f" (hit ratio {ratio:.0%})" if ratio is not None else "  daemon metrics: no caching yet"
                )


def _daemon_metrics(listen: str) -> dict | None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{listen}/status", timeout=2) as resp:  # noqa: S310 - the daemon's own address
            return json.loads(resp.read())["metrics"]
    except (OSError, ValueError, KeyError):
        return None


@app.command()
def verify(
    ref: Annotated[str, typer.Argument(help="NAME@REF")],
    site: SiteOpt = None,
    repair: Annotated[bool, typer.Option("--repair", help="Re-fetch damaged or missing files from the lake.")] = False,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-hash a cached commit (or a partial cache: --include/--exclude) against its manifest (exit 9 if damaged and not repaired)."""
    with _hub() as hub:
        r = hub.verify(ref, site=site, repair=repair, progress=_progress(not json_out), include=include, exclude=exclude)
    if json_out:
        body = {**_asdict(r), "ok": r.ok}
        _emit(body)
    else:
        for p in r.damaged:
            typer.echo(f"damaged  {p}{'  (repaired)' if p in r.repaired else ''}")
        for p in r.missing:
            typer.echo(f"missing  {p}{'  (repaired)' if p in r.repaired else ''}")
        typer.echo(f"{r.dataset}@{r.commit[:12]} at {r.site}: {r.files} files, {'OK' if r.ok else 'DAMAGED: run with --repair'}")
    if not r.ok:
        raise typer.Exit(9)


def _site_line(s: Any) -> str:
    from cachehub.policy import format_duration, format_size

    quota = format_size(s.quota) or "none"
    return (
        f"site {s.name} -> {s.root} (link {s.link}, ttl {format_duration(s.ttl)}, quota {quota}, "
        f"low-watermark {s.low_watermark:.0%}, min-free {s.min_free:.0%}, grace {format_duration(s.grace)}, "
        f"keep-partial {format_duration(s.keep_partial)}, group {s.group or '-'})"
    )


def _asdict(value: Any) -> dict:
    from cachehub.model import to_dict

    return to_dict(value)


# -- lifecycle -------------------------------------------------------------------------------
@app.command()
def pin(
    ref: Annotated[str, typer.Argument(help="NAME@REF (cached at the site).")],
    site: SiteOpt = None,
    reason: Annotated[str, typer.Option("--reason", help="Why it must stay (audited).")] = "",
) -> None:
    """Pin a cached commit: it is never evicted until unpinned."""
    with _hub() as hub:
        changed = hub.pin(ref, site=site, reason=reason)
    typer.echo(f"pinned {ref}" if changed else f"{ref} was already pinned")


@app.command()
def unpin(ref: Annotated[str, typer.Argument(help="NAME@REF")], site: SiteOpt = None) -> None:
    """Unpin a cached commit (it becomes evictable again)."""
    with _hub() as hub:
        changed = hub.unpin(ref, site=site)
    typer.echo(f"unpinned {ref}" if changed else f"{ref} was not pinned")


@app.command()
def evict(
    refs: Annotated[Optional[list[str]], typer.Argument(help="NAME@REF entries to evict (default: apply the site policy).")] = None,  # noqa: UP007
    site: SiteOpt = None,
    expired: Annotated[bool, typer.Option("--expired", help="Only entries idle longer than the site's TTL.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and stop.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove cache copies (never lake data): the given entries, or expired then least recently used ones."""
    from cachehub.evict import describe

    with _hub() as hub:
        plan, result = hub.evict(refs or None, site=site, expired_only=expired, dry_run=dry_run)
    body = describe(plan)
    if result is not None:
        body["evicted"] = [e.entry.commit for e in result.evicted]
        body["restored"] = list(result.restored)
        body["gc_objects"], body["gc_bytes"] = result.gc_objects, result.gc_bytes
    if json_out:
        _emit(body)
        return
    verb = "would evict" if dry_run else "evicting"
    if not plan.evict:
        typer.echo("nothing to evict")
    for e in plan.evict:
        typer.echo(f"{verb} {e.entry.dataset}@{e.entry.commit[:12]}  {e.reason:9} {_size(e.entry.bytes)} (frees {_size(e.entry.exclusive_bytes)})")
    for e, why in plan.kept:
        typer.echo(f"keeping {e.dataset}@{e.commit[:12]}  {why}")
    if plan.shortfall:
        typer.echo(f"still {_size(plan.shortfall)} over the site's limits after every evictable entry", err=True)
    if result is not None:
        for cid in result.restored:
            typer.echo(f"kept {cid[:12]}: used or leased while being evicted")
        typer.echo(f"removed {len(result.evicted)} entries; freed {result.gc_objects} objects ({_size(result.gc_bytes)})")


@app.command()
def gc(
    site: SiteOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would be removed.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove content at a site that no cached commit references."""
    with _hub() as hub:
        r = hub.gc(site=site, dry_run=dry_run)
    if json_out:
        _emit(r)
    else:
        typer.echo(f"{'would remove' if dry_run else 'removed'} {r.objects} objects ({_size(r.bytes)})")


@app.command()
def leases(site: SiteOpt = None, json_out: JsonOpt = False) -> None:
    """List leases (running jobs' claims) at a site."""
    with _hub() as hub:
        rows = hub.leases(site)
    _listing(
        rows,
        json_out,
        "no leases",
        lambda r: f"{r.commit[:12]}  {r.user}@{r.host} pid {r.pid}  run {r.run or '-'}  {'live' if r.live else 'DEAD'}",
    )


@app.command()
def subscribe(
    ref: Annotated[str, typer.Argument(help="NAME@REF to keep cached, usually NAME@latest.")],
    site: SiteOpt = None,
    every: Annotated[str, typer.Option("--every", help="How often the daemon checks the lake, e.g. 10m.")] = "10m",
    json_out: JsonOpt = False,
) -> None:
    """Keep a ref cached at a site: the daemon prefetches each new commit as a delta."""
    with _hub() as hub:
        sub = hub.subscribe(ref, site=site, every=every)
    if json_out:
        _emit(sub)
    else:
        typer.echo(f"subscribed {sub.dataset}@{sub.ref} at {sub.site} every {every} (served by cachehub daemon)")


@app.command()
def unsubscribe(ref: Annotated[str, typer.Argument(help="NAME@REF")], site: SiteOpt = None) -> None:
    """Stop keeping a ref cached at a site."""
    with _hub() as hub:
        removed = hub.unsubscribe(ref, site=site)
    typer.echo(f"unsubscribed {ref}" if removed else f"no subscription for {ref}")


@app.command()
def subscriptions(json_out: JsonOpt = False) -> None:
    """List subscriptions."""
    with _hub() as hub:
        subs = hub.subscriptions()
    _listing(subs, json_out, "no subscriptions", lambda s: f"{s.dataset}@{s.ref}  site {s.site}  every {s.every:g}s")


@app.command()
def daemon(
    sites: Annotated[Optional[list[str]], typer.Option("--site", "-s", help="Sites to serve (repeatable; default: all).")] = None,  # noqa: UP007
    listen: Annotated[str, typer.Option("--listen", help="HTTP address of the dashboard, /status and /metrics; 'off' to disable.")] = "127.0.0.1:8731",
    sweep: Annotated[str, typer.Option("--sweep", help="How often to evict expired / over-capacity entries.")] = "1m",
    refresh: Annotated[str, typer.Option("--refresh", help="How often to index new commits and tags from the lake.")] = "1m",
    gc_every: Annotated[str, typer.Option("--gc", help="How often a sweep also walks objects/ to collect garbage (a full walk).")] = "1h",
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, warning.")] = "info",
    token_file: TokenOpt = None,
    log_format: Annotated[str, typer.Option("--log-format", help="text (default) or json: one JSON object per line.")] = "text",
) -> None:
    """Run the background service in the foreground (systemd-friendly; SIGTERM stops it cleanly).

    It also serves the dashboard on --listen (docs/dashboard.md)."""
    import logging

    from cachehub.daemon import Daemon, run_forever
    from cachehub.policy import parse_duration

    from cachehub.errors import ConfigError

    if log_format not in ("text", "json"):
        raise ConfigError(f"--log-format must be text or json, not {log_format!r}")
    handler = logging.StreamHandler()
    if log_format == "json":
        from cachehub.logs import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=log_level.upper(), handlers=[handler])
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    with _hub() as hub:
        settings = hub.settings
    from cachehub.web import load_token

    d = Daemon(
        settings,
        sites=sites,
        listen=None if listen == "off" else listen,
        token=load_token(token_file),
        sweep_every=parse_duration(sweep),
        refresh_every=parse_duration(refresh),
        gc_every=parse_duration(gc_every),
    )
    run_forever(d)


@app.command()
def ui(
    listen: Annotated[str, typer.Option("--listen", help="HTTP address of the dashboard (the daemon's default is 8731).")] = "127.0.0.1:8732",
    token_file: TokenOpt = None,
    refresh: Annotated[bool, typer.Option("--refresh/--no-refresh", help="Index the lake's datasets before serving.")] = True,
) -> None:
    """Serve the dashboard alone, without the daemon's background jobs (e.g. on a laptop)."""
    import signal
    import threading

    from cachehub.web import Server, bind, create_app, load_token

    token = load_token(token_file)
    sock, loopback = bind(listen, token=token)  # refused at once: before the refresh
    with _hub() as hub:
        settings = hub.settings
        if refresh:
            from cachehub.errors import CachehubError

            try:
                for name in hub.lake.datasets():
                    hub.refresh(name)
            except (CachehubError, OSError) as exc:  # the lake may be unreachable: serve what the catalog knows
                typer.echo(f"warning: could not refresh the catalog from the lake ({exc}); showing what it already holds", err=True)
    server = Server(create_app(settings, token=token, loopback=loopback), sock)
    typer.echo(f"cachehub dashboard on http://{server.address}/" + ("" if token else " (read-only: no --token-file)"), err=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.close()


# -- provenance ------------------------------------------------------------------------------
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    command: Annotated[list[str], typer.Argument(help="The command to run, after --.")],
    use: Annotated[Optional[list[str]], typer.Option("--use", help="Input NAME@REF (repeatable): resolved, leased, exported.")] = None,  # noqa: UP007
    snapshot: Annotated[Optional[list[str]], typer.Option("--snapshot", help="DIR:DATASET to snapshot when the command succeeds (repeatable).")] = None,  # noqa: UP007
    site: SiteOpt = None,
    snapshot_on_failure: Annotated[bool, typer.Option("--snapshot-on-failure", help="Snapshot even if the command fails.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Run a training command with leased inputs; record the run; snapshot its outputs."""
    pairs = []
    for spec in snapshot or []:
        directory, sep, dataset = spec.rpartition(":")
        if not sep or not directory or not dataset:
            raise typer.BadParameter(f"--snapshot {spec!r}: expected DIR:DATASET, e.g. ./checkpoints:resnet50-ckpt")
        pairs.append((directory, dataset))
    with _hub() as hub:
        result = hub.run(list(command), uses=use or [], snapshots=pairs, site=site, snapshot_on_failure=snapshot_on_failure)
    if json_out:
        _emit(result)
    else:
        outs = ", ".join(f"{o['dataset']}@{o['commit'][:12]}" for o in result.outputs) or "none"
        typer.echo(f"run {result.id}: {result.status} (exit {result.exit_code}) in {result.duration:.1f}s; snapshots: {outs}", err=True)
    raise typer.Exit(result.exit_code)


@app.command()
def lineage(
    ref: Annotated[str, typer.Argument(help="NAME@REF")],
    up: Annotated[bool, typer.Option("--up", help="Only where it came from.")] = False,
    down: Annotated[bool, typer.Option("--down", help="Only what came from it.")] = False,
    depth: Annotated[Optional[int], typer.Option("--depth", help="At most N hops.")] = None,  # noqa: UP007
    fmt: Annotated[str, typer.Option("--format", help="text | json | dot | mermaid")] = "text",
) -> None:
    """Show a commit's lineage: parents, inputs and transforms upstream; derived data and runs downstream."""
    from cachehub import lineage as lin

    if fmt not in ("text", "json", "dot", "mermaid"):
        raise typer.BadParameter("--format must be text, json, dot or mermaid")
    with _hub() as hub:
        graph = hub.lineage(ref, up=up or not down, down=down or not up, depth=depth)
    start = next(iter(graph.nodes))
    if fmt == "json":
        _emit(lin.to_json(graph))
    elif fmt == "dot":
        typer.echo(lin.to_dot(graph), nl=False)
    elif fmt == "mermaid":
        typer.echo(lin.to_mermaid(graph), nl=False)
    else:
        typer.echo(lin.to_text(graph, start), nl=False)


@audit_app.callback()
def audit(
    ctx: typer.Context,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Only this dataset.")] = None,  # noqa: UP007
    action: Annotated[Optional[str], typer.Option("--action", help="Only this action (push, tag, cache, resolve, use, evict...).")] = None,  # noqa: UP007
    user: Annotated[Optional[str], typer.Option("--user", help="Only this user.")] = None,  # noqa: UP007
    since: Annotated[Optional[str], typer.Option("--since", help="Only events at or after this ISO time, e.g. 2026-11-01.")] = None,  # noqa: UP007
    json_out: JsonOpt = False,
) -> None:
    """List audit events (every state change), oldest first."""
    if ctx.invoked_subcommand is not None:
        return
    with _hub() as hub:
        events = hub.audit(dataset=dataset, action=action, user=user, since=since)
    _listing(
        events,
        json_out,
        "no matching events",
        lambda e: f"{e.time}  {e.user}@{e.host}  {e.action:16} "
        + " ".join(x for x in (f"{e.dataset}@{e.commit[:12]}" if e.dataset and e.commit else e.dataset or "", f"site {e.site}" if e.site else "") if x),
    )


@audit_app.command("verify")
def audit_verify(json_out: JsonOpt = False) -> None:
    """Check the hash chains: detect an edited, deleted or re-ordered event (exit 9 if broken)."""
    with _hub() as hub:
        problems = hub.audit_verify()
        count = hub.audit_count()
    if json_out:
        _emit({"events": count, "ok": not problems, "problems": [p.__dict__ for p in problems]})
    else:
        for p in problems:
            typer.echo(f"BROKEN at {p.origin}:{p.seq}: {p.message}")
        typer.echo(f"{count} events checked: {'intact' if not problems else f'{len(problems)} problem(s)'}")
    if problems:
        raise typer.Exit(9)


@audit_app.command("push")
def audit_push() -> None:
    """Copy audit events not yet in the lake to the lake now."""
    with _hub() as hub:
        n = hub.ship_audit()
    typer.echo(f"shipped {n} events to the lake")


@app.command("snapshot")
def snapshot_cmd(
    directory: Annotated[str, typer.Argument(help="Working directory to snapshot.")],
    dataset: Annotated[str, typer.Argument(help="Dataset to commit it to.")],
    message: Annotated[str, typer.Option("--message", "-m", help="Commit message.")] = "",
    tag: Annotated[Optional[str], typer.Option(help="Tag the new commit.")] = None,  # noqa: UP007
    json_out: JsonOpt = False,
) -> None:
    """A new commit from a working directory, re-hashing only files that changed since last seen."""
    with _hub() as hub:
        r = hub.snapshot(directory, dataset, message=message, tag=tag, progress=_progress(not json_out))
    if json_out:
        _emit(r)
    elif not r.created:
        typer.echo(f"{dataset}: nothing changed since {r.commit[:12]} ({r.hashed_files} files re-hashed)")  # type: ignore[index]
    else:
        typer.echo(f"{dataset}@{r.commit[:12]}: {r.files} files, {r.hashed_files} re-hashed, uploaded {r.uploaded_files} ({_size(r.uploaded_bytes)})")  # type: ignore[index]


@app.command("restore")
def restore_cmd(
    ref: Annotated[str, typer.Argument(help="NAME@REF to restore.")],
    directory: Annotated[str, typer.Argument(help="New or empty directory for the writable copy.")],
    json_out: JsonOpt = False,
) -> None:
    """Write a writable working copy of a commit (history is never rewritten)."""
    with _hub() as hub:
        r = hub.restore(ref, directory)
    if json_out:
        _emit(r)
    else:
        where = f"site {r.from_site}" if r.from_site else "the lake"
        typer.echo(f"restored {r.dataset}@{r.commit[:12]} ({r.files} files, {_size(r.bytes)}) from {where} into {r.path}")


@app.command()
def purge(
    ref: Annotated[str, typer.Argument(help="NAME@REF to erase.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded in the tombstone and the audit trail).")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Erase a commit: its unshared content in the lake and every site; leaves a tombstone."""
    if not yes and sys.stdin.isatty():
        typer.confirm(f"Erase {ref} from the lake and every site? This cannot be undone", abort=True)
    with _hub() as hub:
        r = hub.purge(ref, reason=reason)
    if json_out:
        _emit(r)
    else:
        typer.echo(
            f"purged {r.dataset}@{r.commit[:12]}: removed {r.removed_objects} objects ({_size(r.removed_bytes)}), "
            f"kept {r.kept_shared} shared; tags removed: {', '.join(r.tags_removed) or 'none'}; sites: {', '.join(r.sites_evicted) or 'none'}"
        )


# -- sites -----------------------------------------------------------------------------------
TtlOpt = Annotated[Optional[str], typer.Option("--ttl", help="Evict entries idle this long: 1d (default), 12h, 0 = never.")]  # noqa: UP007
QuotaOpt = Annotated[Optional[str], typer.Option("--quota", help="Bytes the site may use, e.g. 2T, 500G; 0 = no quota.")]  # noqa: UP007
LowOpt = Annotated[Optional[str], typer.Option("--low-watermark", help="Capacity eviction frees down to this share of the quota (default 80%).")]  # noqa: UP007
MinFreeOpt = Annotated[Optional[str], typer.Option("--min-free", help="Keep this share of the filesystem free, e.g. 10% (default 0 = off).")]  # noqa: UP007
GraceOpt = Annotated[Optional[str], typer.Option("--grace", help="A bare resolve() protects an entry this long (default 10m).")]  # noqa: UP007
KeepPartialOpt = Annotated[Optional[str], typer.Option("--keep-partial", help="Keep the objects of an interrupted cache this long for a re-run (default 1d).")]  # noqa: UP007
GroupOpt = Annotated[Optional[str], typer.Option("--group", help="Unix group sharing the site: trees group-readable, leases/queue group-writable; '' = none.")]  # noqa: UP007


@site_app.command("add")
def site_add(
    name: Annotated[str, typer.Argument(help="Site name, e.g. gpu-a.")],
    root: Annotated[str, typer.Option("--root", help="Cache root (an NFS export or any POSIX path).")],
    link: Annotated[Optional[str], typer.Option("--link", help="auto (default) | hardlink | symlink | copy")] = None,  # noqa: UP007
    ttl: TtlOpt = None,
    quota: QuotaOpt = None,
    low_watermark: LowOpt = None,
    min_free: MinFreeOpt = None,
    grace: GraceOpt = None,
    keep_partial: KeepPartialOpt = None,
    group: GroupOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Add a site: lay out a new root with its policy, or join one another host laid out."""
    with _hub() as hub:
        s = hub.site_add(
            name, root, link=link, ttl=ttl, quota=quota, low_watermark=low_watermark, min_free=min_free, grace=grace,
            keep_partial=keep_partial, group=group,
        )  # fmt: skip
    if json_out:
        _emit(s)
    else:
        typer.echo(_site_line(s))


@site_app.command("set")
def site_set(
    name: Annotated[str, typer.Argument(help="Site name.")],
    root: Annotated[Optional[str], typer.Option("--root", help="New cache root (the old one is left as it is).")] = None,  # noqa: UP007
    create: Annotated[bool, typer.Option("--create", help="Lay out the (new) root if it is not a site yet.")] = False,
    link: Annotated[Optional[str], typer.Option("--link", help="auto | hardlink | symlink | copy")] = None,  # noqa: UP007
    ttl: TtlOpt = None,
    quota: QuotaOpt = None,
    low_watermark: LowOpt = None,
    min_free: MinFreeOpt = None,
    grace: GraceOpt = None,
    keep_partial: KeepPartialOpt = None,
    group: GroupOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Change a site's policy (for every host using it), or this home's root for it."""
    with _hub() as hub:
        s = hub.site_set(
            name, root=root, create=create, link=link, ttl=ttl, quota=quota, low_watermark=low_watermark, min_free=min_free,
            grace=grace, keep_partial=keep_partial, group=group,
        )  # fmt: skip
    if json_out:
        _emit(s)
    else:
        typer.echo(_site_line(s))


@site_app.command("list")
def site_list(json_out: JsonOpt = False) -> None:
    """List sites."""
    with _hub() as hub:
        sites = hub.sites()
        default = hub.settings.default_site
    if json_out:
        _emit([{**_asdict(s), "default": s.name == default} for s in sites])
        return
    for s in sites:
        typer.echo(f"{'*' if s.name == default else ' '} {s.name:20} {s.root}  (link {s.link})")


@site_app.command("show")
def site_show(name: Annotated[str, typer.Argument(help="Site name.")], json_out: JsonOpt = False) -> None:
    """Show a site's root, link mode and cached commits."""
    with _hub() as hub:
        hub.settings.site(name)
        rows = hub.status(name)
    if json_out:
        _emit(rows[0])
        return
    s = rows[0]
    typer.echo(f"site   {s.site}\nroot   {s.root}\nlink   {s.link}\nfree   {_size(s.fs_free)}")
    typer.echo(f"cached {len(s.commits)} commits, {_size(s.object_bytes)} on disk")
    for c in s.commits:
        typer.echo(f"  {c.dataset}@{c.commit[:12]}  {c.files} files  {_size(c.bytes)}")


@catalog_app.command("rebuild")
def catalog_rebuild(json_out: JsonOpt = False) -> None:
    """Rebuild the catalog from the lake and the site roots (the audit trail is kept)."""
    with _hub() as hub:
        counts = hub.rebuild_catalog()
    if json_out:
        _emit(counts)
        return
    problems = counts.pop("problems")
    typer.echo(", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
    for problem in problems:  # type: ignore[attr-defined]
        typer.echo(f"warning: skipped {problem}", err=True)


class Interrupted(BaseException):
    """Ctrl-C. Not a KeyboardInterrupt, which click would turn into "Aborted!" and exit 1."""


def _interrupted(_signum: int, _frame: object) -> None:
    raise Interrupted()


def main() -> None:
    """Entry point: run the app; library errors become one line and the error's exit code.

    Usage errors, ``--help`` and ``typer.Exit`` are handled by Typer itself (exit 2 for usage).
    """
    import signal

    from .exits import arm_deadline, leave

    debug = os.environ.get("CACHEHUB_DEBUG") == "1"
    signal.signal(signal.SIGINT, _interrupted)
    invalid = arm_deadline()
    if invalid is not None:
        sys.exit(invalid)
    code = 0
    try:
        app()
    except SystemExit as exc:  # typer.Exit, --help, usage errors (click prints them)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - every way out goes through _exit below
        code = _report(exc, debug)
    leave(code, [hub.close for hub in _OPENED])


def _report(exc: BaseException, debug: bool) -> int:
    """One line on stderr and the exit code for an error that ended the command."""
    import traceback

    from cachehub.errors import CachehubError

    if isinstance(exc, Interrupted):
        # every step cleans up in its finally blocks on the way here; fetched objects stay
        typer.echo("cachehub: interrupted; re-run to resume", err=True)
        return 130
    if debug or not isinstance(exc, (CachehubError, OSError, ValueError)):
        traceback.print_exception(exc)
        return 1
    typer.echo(f"cachehub: error: {exc}", err=True)
    return exc.exit_code if isinstance(exc, CachehubError) else 1


if __name__ == "__main__":
    main()
