"""Setting up: ``init`` (configuration, catalog, lake marker, default site) and sites (add, set).

A site is a cache root near compute plus its eviction policy. This home's ``config.toml`` maps
its name to its root; the policy lives in the root (``<root>/policy/``, ``SiteStore``), laid out
(``SiteStore.create``) when a new root is added.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .config import DEFAULT_SITE, LINK_MODES, load_settings, policy_for_humans, site_to_config, update_config, validate_site_name
from .context import Context
from .errors import ConfigError, ConflictError, LakeError
from .model import Site
from .results import InitResult
from .policy import parse_duration, parse_fraction, parse_size
from .store import SiteStore


def init(
    *,
    home: str | os.PathLike[str] | None = None,
    lake: str | None = None,
    endpoint_url: str | None = None,
    region: str | None = None,
) -> InitResult:
    """Write the configuration, create the catalog, check the lake and prepare the default site."""
    settings = load_settings(home, lake=lake)
    # every setting this init used is saved, from the options or the environment alike: a lake
    # saved without the endpoint it was reached through would send the next command elsewhere
    endpoint = endpoint_url or settings.endpoint_url
    region = region or settings.region

    def change(data: dict) -> None:
        section = data.setdefault("lake", {})
        section["url"] = settings.lake_url
        if endpoint:
            section["endpoint_url"] = endpoint
        if region:
            section["region"] = region
        defaults = data.setdefault("defaults", {})
        defaults["site"] = settings.default_site if settings.default_site in settings.sites else defaults.get("site", DEFAULT_SITE)

    settings.home.mkdir(parents=True, exist_ok=True)
    path = update_config(settings.home, change)
    ctx = Context(load_settings(home, lake=lake))
    try:
        ctx.lake.ensure_initialised()
        from .doctor import doctor

        try:
            report = doctor(ctx)  # what the server guarantees, recorded in the lake marker
            gaps = tuple(f"{c.name}: {c.detail}; {c.affects}" for c in report.checks if c.state != "ok")
        except (LakeError, ConflictError) as exc:  # read-only credentials: init still works
            gaps = (f"not checked ({exc}); run `cachehub doctor` with credentials that may write to the lake",)
        site = ctx.site()
        if ctx.settings.creates_on_use(site):
            SiteStore(site).create(by=ctx.user)
        else:
            SiteStore(site).check()
        ctx.events.audit("init", lake=ctx.settings.lake_url, site=site.name)
        return InitResult(str(path), str(ctx.settings.catalog_path), ctx.settings.lake_url, site.name, site.root, gaps)
    finally:
        ctx.close()


def add(ctx: Context, name: str, root: str | os.PathLike[str], *, link: str | None = None, **policy: object) -> Site:
    """Register a site (a cache root near compute) in this home and lay out its root.

    A root another host already laid out is joined as it is: its policy stands, unless options
    are given here, which change it for every host (like ``set_``). ``policy`` takes ``ttl``
    ("1d"), ``quota`` ("2T"), ``low_watermark`` ("80%"), ``min_free`` ("10%"), ``grace``
    ("10m"), ``keep_partial`` ("1d") and ``group`` (a Unix group); see docs/operations.md.
    """
    validate_site_name(name)
    if name in ctx.settings.sites and not ctx.settings.creates_on_use(ctx.settings.sites[name]):
        existing = ctx.settings.sites[name]
        raise ConflictError(
            f"site {name!r} already exists (root {existing.root}); change it with: cachehub site set {name} --root PATH"
        )
    configured = Site(name=name, root=os.path.abspath(os.path.expanduser(root)))
    _refuse_catalog_inside(ctx, configured)
    store = SiteStore(with_policy(configured, link=link or "auto", **policy))
    joined = store.exists()
    if joined:
        store.check()
        changes = {"link": link, **policy}
        if any(v is not None for v in changes.values()):
            _change_policy(ctx, store, changes)
    else:
        store.create(by=ctx.user)
    _remember(ctx, configured)
    site = SiteStore(configured).site
    ctx.events.audit("site-add", site=name, root=site.root, joined=joined, **policy_for_humans(site))
    return site


def set_(
    ctx: Context, name: str, *, root: str | os.PathLike[str] | None = None, create: bool = False, **changes: object
) -> Site:
    """Move this home's view of a site to another root, and/or change its policy for every host.

    A new root must already be a site (another host's, or laid out before) unless ``create``
    lays it out. The old root is left as it is. A policy change is a new version of the root's
    policy document, written by compare-and-swap (ConflictError if another host changed it at
    the same moment) and audited; every host and daemon applies it from then on.
    """
    configured = ctx.site(name)
    if root is not None:
        configured = replace(configured, root=os.path.abspath(os.path.expanduser(root)))
        _refuse_catalog_inside(ctx, configured)
    store = SiteStore(configured)
    if create or ctx.settings.creates_on_use(configured):
        store.create(by=ctx.user)
    else:
        store.check()
    version = _change_policy(ctx, store, changes) if any(v is not None for v in changes.values()) else None
    if root is not None:
        _remember(ctx, configured)
    site = SiteStore(configured).site
    ctx.events.audit("site-set", site=name, root=site.root, policy_version=version, **policy_for_humans(site))
    return site


def _change_policy(ctx: Context, store: SiteStore, changes: dict) -> int:
    current = store.read_policy()
    return store.update_policy(with_policy(store.site, **changes), expect=current["version"] if current else 0, by=ctx.user)


def _refuse_catalog_inside(ctx: Context, site: Site) -> None:
    if _inside(ctx.settings.catalog_path, Path(site.root)):
        raise ConfigError(f"site root {site.root} would contain the catalog; the catalog must stay on local disk outside it")


def _remember(ctx: Context, site: Site) -> None:
    """Write this home's mapping of the site's name to its root (config.toml)."""

    def change(data: dict) -> None:
        data.setdefault("sites", {})[site.name] = site_to_config(site)

    update_config(ctx.settings.home, change)
    ctx.with_site(site)


def with_policy(site: Site, **changes: object) -> Site:
    """``site`` with the given (unparsed) policy values applied; None means unchanged."""
    parsers = {
        "ttl": parse_duration, "low_watermark": parse_fraction, "min_free": parse_fraction, "grace": parse_duration,
        "keep_partial": parse_duration, "group": _group,
    }  # fmt: skip
    values: dict[str, object] = {}
    for key, raw in changes.items():
        if raw is None:
            continue
        if key == "link":
            if raw not in LINK_MODES:
                raise ConfigError(f"unknown link mode {raw!r}; use one of {', '.join(LINK_MODES)}")
            values[key] = raw
        elif key == "quota":
            values[key] = None if raw in ("", "0", 0, "none") else parse_size(raw)  # type: ignore[arg-type]
        elif key in parsers:
            values[key] = parsers[key](raw)  # type: ignore[operator]
        else:
            raise TypeError(f"unknown site setting {key!r}")
    return replace(site, **values)  # type: ignore[arg-type]


def _group(value: object) -> str | None:
    """A Unix group name (that exists here), or None for "" / "none"."""
    if value in ("", "none", None):
        return None
    import grp

    try:
        grp.getgrnam(str(value))
    except KeyError:
        raise ConfigError(f"no Unix group {value!r} on this host; create it (groupadd) or pick another with --group") from None
    return str(value)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
