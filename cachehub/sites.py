"""Setting up: ``init`` (configuration, catalog, lake marker, default site) and sites (add, set).

A site is a cache root near compute plus its eviction policy. Its name and policy are written
to this home's ``config.toml``; its root is laid out (``SiteStore.ensure``) when it is added.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from .config import DEFAULT_SITE, LINK_MODES, load_settings, site_to_config, update_config, validate_site_name
from .context import Context
from .errors import ConfigError, ConflictError
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

    def change(data: dict) -> None:
        section = data.setdefault("lake", {})
        section["url"] = settings.lake_url
        if endpoint_url:
            section["endpoint_url"] = endpoint_url
        if region:
            section["region"] = region
        data.setdefault("defaults", {}).setdefault("site", DEFAULT_SITE)

    settings.home.mkdir(parents=True, exist_ok=True)
    path = update_config(settings.home, change)
    ctx = Context(load_settings(home, lake=lake))
    try:
        ctx.lake.ensure_initialised()
        site = ctx.site()
        SiteStore(site).ensure()
        ctx.events.audit("init", lake=ctx.settings.lake_url, site=site.name)
        return InitResult(str(path), str(ctx.settings.catalog_path), ctx.settings.lake_url, site.name, site.root)
    finally:
        ctx.close()


def add(ctx: Context, name: str, root: str | os.PathLike[str], *, link: str = "auto", **policy: object) -> Site:
    """Register a site (a cache root near compute) in config.toml and lay out its root.

    ``policy`` takes ``ttl`` ("1d", seconds), ``quota`` ("2T", bytes), ``low_watermark``
    ("80%"), ``min_free`` ("10%") and ``grace`` ("10m"); see docs/operations.md.
    """
    validate_site_name(name)
    if name in ctx.settings.sites:
        existing = ctx.settings.sites[name]
        raise ConflictError(
            f"site {name!r} already exists (root {existing.root}); change it with: cachehub site set {name} --root PATH"
        )
    site = with_policy(Site(name=name, root=os.path.abspath(os.path.expanduser(root))), link=link, **policy)
    return _save(ctx, site, "site-add")


def set_(ctx: Context, name: str, *, root: str | os.PathLike[str] | None = None, **changes: object) -> Site:
    """Change a site's root, link mode or policy (an old root is left as it is)."""
    current = ctx.site(name)
    if root is not None:
        current = replace(current, root=os.path.abspath(os.path.expanduser(root)))
    return _save(ctx, with_policy(current, **changes), "site-set")


def _save(ctx: Context, site: Site, action: str) -> Site:
    if _inside(ctx.settings.catalog_path, Path(site.root)):
        raise ConfigError(f"site root {site.root} would contain the catalog; the catalog must stay on local disk outside it")
    SiteStore(site).ensure()

    def change(data: dict) -> None:
        data.setdefault("sites", {})[site.name] = site_to_config(site)

    update_config(ctx.settings.home, change)
    ctx.with_site(site)
    ctx.events.audit(action, site=site.name, **site_to_config(site))
    return site


def with_policy(site: Site, **changes: object) -> Site:
    """``site`` with the given (unparsed) policy values applied; None means unchanged."""
    parsers = {"ttl": parse_duration, "low_watermark": parse_fraction, "min_free": parse_fraction, "grace": parse_duration}
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


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False
