"""The one place that reads the environment and the configuration file.

Precedence, highest first: explicit keyword arguments, environment variables, ``config.toml``
under ``CACHEHUB_HOME``, built-in defaults (the embedded default: a local-directory lake and a
site called ``local``, both under ``CACHEHUB_HOME``).

Environment variables:
    CACHEHUB_HOME          state directory (default ``$XDG_DATA_HOME/cachehub`` or ``~/.local/share/cachehub``)
    CACHEHUB_CONFIG        configuration file (default ``$CACHEHUB_HOME/config.toml``)
    CACHEHUB_LAKE          lake URL (``/path``, ``file:///path`` or ``s3://bucket/prefix``)
    CACHEHUB_ENDPOINT_URL  S3 endpoint for non-AWS servers (StorageGRID, MinIO, SeaweedFS...)
    CACHEHUB_SITE          default site name
    CACHEHUB_JOBS          concurrent transfers (default 64)
    CACHEHUB_OFFLINE       1: never contact the lake (resolve from the catalog and the site's refs)
    CACHEHUB_MAX_STALENESS how old (seconds) the catalog's tags may be before resolve reads the lake (60)

Credentials are never read here: S3 uses the standard AWS chain and nothing is written back.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, InvalidRefError, SiteNotFoundError
from .fsutil import atomic_write
from .model import Site
from .policy import (
    DEFAULT_GRACE,
    DEFAULT_LOW_WATERMARK,
    DEFAULT_MIN_FREE,
    DEFAULT_TTL,
    format_duration,
    format_size,
    parse_duration,
    parse_fraction,
    parse_size,
)
from .refs import validate_dataset_name

CONFIG_FORMAT_VERSION = 1
DEFAULT_SITE = "local"
DEFAULT_JOBS = 64
DEFAULT_MAX_STALENESS = 60.0
LINK_MODES = ("auto", "hardlink", "symlink", "copy")


def default_home() -> Path:
    env = os.environ.get("CACHEHUB_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "cachehub"


@dataclass(frozen=True)
class Settings:
    """Everything cachehub needs to know about where things are."""

    home: Path
    lake_url: str
    endpoint_url: str | None = None
    region: str | None = None
    default_site: str = DEFAULT_SITE
    sites: dict[str, Site] = field(default_factory=dict)
    jobs: int = DEFAULT_JOBS
    config_path: Path | None = None
    hooks: dict[str, list[str]] = field(default_factory=dict)  # event -> shell commands
    offline: bool = False  # CACHEHUB_OFFLINE=1: the lake is never contacted
    max_staleness: float = DEFAULT_MAX_STALENESS  # seconds a tag read from the lake stays good for resolve
    # S3 credentials given in code (the filesystem's key/secret/token options); None: the standard
    # chain. Never written anywhere, never shown (repr=False)
    credentials: Mapping[str, str] | None = field(default=None, repr=False, compare=False)

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.db"

    @property
    def tmp_dir(self) -> Path:
        return self.home / "tmp"

    @property
    def manifest_cache(self) -> Path:
        return self.home / "manifests"

    def creates_on_use(self, site: Site) -> bool:
        """Is ``site`` the embedded default (``local``, under this home), laid out on first use?

        Every other site root is created only by ``site add`` (or ``--create``): a configured root
        that is missing is an unmounted export, never something to fill the local disk with.
        """
        return site.name == DEFAULT_SITE and Path(site.root) == self.home / "sites" / DEFAULT_SITE

    def site(self, name: str | None = None) -> Site:
        """The named site, or the default one; raise SiteNotFoundError naming the fix."""
        name = name or self.default_site
        try:
            return self.sites[name]
        except KeyError:
            known = ", ".join(sorted(self.sites)) or "none"
            raise SiteNotFoundError(
                f"unknown site {name!r} (configured: {known}); add it with: cachehub site add {name} --root PATH",
                site=name,
            ) from None


def load_settings(home: str | os.PathLike[str] | None = None, *, lake: str | None = None) -> Settings:
    """Read settings from the environment and the configuration file (which may not exist)."""
    home_path = Path(home).expanduser() if home is not None else default_home()
    config_path = config_path_for(home_path)
    data: dict = {}
    if config_path.exists():
        try:
            data = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {config_path}: {exc}; fix or remove it, then run cachehub init") from exc
        version = data.get("format_version", CONFIG_FORMAT_VERSION)
        if version != CONFIG_FORMAT_VERSION:
            raise ConfigError(
                f"{config_path} has format_version {version}; this cachehub reads {CONFIG_FORMAT_VERSION}: upgrade cachehub"
            )
    lake_section = data.get("lake", {})
    lake_url = lake or os.environ.get("CACHEHUB_LAKE") or lake_section.get("url") or str(home_path / "lake")
    endpoint = os.environ.get("CACHEHUB_ENDPOINT_URL") or lake_section.get("endpoint_url")
    region = lake_section.get("region")
    sites: dict[str, Site] = {}
    for name, spec in data.get("sites", {}).items():
        sites[name] = _site_from(name, spec, config_path)
    if DEFAULT_SITE not in sites:
        sites[DEFAULT_SITE] = Site(DEFAULT_SITE, str(home_path / "sites" / DEFAULT_SITE))
    defaults = data.get("defaults", {})
    default_site = os.environ.get("CACHEHUB_SITE") or defaults.get("site") or DEFAULT_SITE
    jobs_text = os.environ.get("CACHEHUB_JOBS") or defaults.get("jobs") or DEFAULT_JOBS
    try:
        jobs = max(1, int(jobs_text))
    except ValueError:
        raise ConfigError(f"CACHEHUB_JOBS must be a whole number, not {jobs_text!r}") from None
    hooks = _hooks_from(data.get("hooks", {}), config_path)
    offline = os.environ.get("CACHEHUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    staleness_text = os.environ.get("CACHEHUB_MAX_STALENESS") or defaults.get("max_staleness") or DEFAULT_MAX_STALENESS
    try:
        max_staleness = parse_duration(staleness_text)
    except ConfigError:
        raise ConfigError(f"CACHEHUB_MAX_STALENESS must be a duration (60, 5m...), not {staleness_text!r}") from None
    return Settings(
        offline=offline,
        max_staleness=max_staleness,
        hooks=hooks,
        home=home_path,
        lake_url=lake_url,
        endpoint_url=endpoint,
        region=region,
        default_site=default_site,
        sites=sites,
        jobs=jobs,
        config_path=config_path,
    )


def _hooks_from(table: dict, where: Path) -> dict[str, list[str]]:
    from .hooks import EVENTS

    out: dict[str, list[str]] = {}
    for event, value in table.items():
        if event not in EVENTS:
            raise ConfigError(f"{where}: unknown hook {event!r}; use one of {', '.join(EVENTS)}")
        commands = [value] if isinstance(value, str) else value
        if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
            raise ConfigError(f"{where}: hook {event} must be a command string or a list of them")
        out[event] = commands
    return out


def validate_site_name(name: str) -> str:
    """Site names follow the dataset-name rules (they become path segments and TOML keys)."""
    try:
        return validate_dataset_name(name)
    except InvalidRefError:
        raise InvalidRefError(
            f"invalid site name {name!r}: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter, digit or '_'",
            value=name,
        ) from None


def _site_from(name: str, spec: dict, where: Path) -> Site:
    try:
        validate_site_name(name)
    except InvalidRefError:
        raise ConfigError(f"{where}: invalid site name {name!r}") from None
    if not isinstance(spec, dict) or "root" not in spec:
        raise ConfigError(f"{where}: site {name!r} needs a root = \"/path\"")
    link = spec.get("link", "auto")
    if link not in LINK_MODES:
        raise ConfigError(f"{where}: site {name!r} has link = {link!r}; use one of {', '.join(LINK_MODES)}")
    quota = spec.get("quota")
    return Site(
        name=name,
        root=str(Path(spec["root"]).expanduser()),
        link=link,
        ttl=parse_duration(spec.get("ttl", DEFAULT_TTL)),
        quota=parse_size(quota) if quota not in (None, "", 0, "0") else None,
        low_watermark=parse_fraction(spec.get("low_watermark", DEFAULT_LOW_WATERMARK)),
        min_free=parse_fraction(spec.get("min_free", DEFAULT_MIN_FREE)),
        grace=parse_duration(spec.get("grace", DEFAULT_GRACE)),
    )  # the policy values of a config written by an older cachehub seed the root's first policy


def site_to_config(site: Site) -> dict:
    """The config.toml table of a site: only its root. The policy lives in the root itself."""
    return {"root": site.root}


def policy_for_humans(site: Site) -> dict:
    """A site's policy in human units (for the audit trail and messages)."""
    table: dict = {"link": site.link, "ttl": format_duration(site.ttl), "quota": format_size(site.quota) if site.quota else None}
    table["low_watermark"] = f"{site.low_watermark * 100:g}%"
    table["min_free"] = f"{site.min_free * 100:g}%"
    table["grace"] = format_duration(site.grace)
    table["keep_partial"] = format_duration(site.keep_partial)
    table["group"] = site.group
    return table


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _toml_dump(data: dict) -> str:
    """TOML for the shapes config.toml uses: scalars, tables, and tables of tables."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]

    def table(prefix: str, body: dict) -> None:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        if scalars or not body:
            lines.extend(["", f"[{prefix}]"])
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)

    for key, value in data.items():
        if isinstance(value, dict):
            table(key, value)
    return "\n".join(lines).lstrip("\n") + "\n"


def config_path_for(home: Path) -> Path:
    return Path(os.environ.get("CACHEHUB_CONFIG") or home / "config.toml")


def update_config(home: Path, change: Callable[[dict], None]) -> Path:
    """Apply ``change`` to the configuration *file* (not to environment overrides); write atomically.

    Only what ``change`` sets is written, so CACHEHUB_LAKE and friends never leak into the
    file. Comments in the file are not preserved.
    """
    path = config_path_for(home)
    data: dict = {}
    if path.exists():
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    data.setdefault("format_version", CONFIG_FORMAT_VERSION)
    change(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, _toml_dump(data).encode("utf-8"))
    return path


def lake_uri(url: str) -> str:
    """The lake as a URI (``file:///abs/path`` for a directory), for lineage systems."""
    return url.rstrip("/") if "://" in url else "file://" + os.path.abspath(os.path.expanduser(url))


def lake_identity(url: str) -> str:
    """A stable name for a lake URL (absolute path for a directory, URL without trailing / for S3)."""
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    path = url[len("file://") :] if url.startswith("file://") else url
    return os.path.abspath(os.path.expanduser(path))
