"""The Context: what every worker needs, and nothing more.

A worker (push, cache, evict, purge, ...) takes a ``Context`` -- or only the pieces it needs:
a ``Lake``, a ``SiteStore`` -- and never the ``Hub`` facade. That keeps the layers one way
round: the facade and the entry points (CLI, daemon, HTTP) build a Context and call workers;
workers call owners (catalog, lake, store) and each other, never back up.

What it carries:

* ``settings``: where things are (``config.py``);
* ``lake`` and ``catalog``: opened on first use, so a call answered from a site root alone
  (``resolve`` of a full commit id) opens no lake;
* identity and clock: ``user``, ``host``, ``now()``;
* ``events``: the sink for audit events and hooks (one place calls both).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from . import hooks
from .catalog import Catalog, current_user
from .config import Settings, lake_identity, lake_uri, load_settings
from .errors import CachehubError, ConfigError, LakeError
from .fsutil import HOST, unique_suffix
from .lake import Lake, now_iso
from .model import Site
from .store import ManifestSource, SiteStore, sweep_dead_entries


_generated: dict[int, str] = {}  # pid -> run id made up for a process with none in its environment


def current_run_id() -> tuple[str, str]:
    """(run id, where it came from) for this process."""
    env = os.environ
    if env.get("CACHEHUB_RUN_ID"):
        return env["CACHEHUB_RUN_ID"], "CACHEHUB_RUN_ID"
    if env.get("MLFLOW_RUN_ID"):
        return f"mlflow-{env['MLFLOW_RUN_ID']}", "mlflow"
    if env.get("SLURM_JOB_ID"):
        task = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f"-{task}" if task else ""), "slurm"
    if env.get("KUBERNETES_SERVICE_HOST") and env.get("HOSTNAME"):
        return f"k8s-{env['HOSTNAME']}", "kubernetes"
    pid = os.getpid()
    if pid not in _generated:
        _generated[pid] = f"run-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    return _generated[pid], "generated"



class Events:
    """The audit and hook sink: every state change is told here once."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def audit(self, action: str, **fields: object) -> None:
        """Append one event to the catalog's hash-chained trail."""
        self._ctx.catalog.audit(action, **fields)  # type: ignore[arg-type]

    def hook(self, event: str, **context: object) -> None:
        """Run the hooks for ``event`` (a ``pre_*`` hook that fails raises HookError)."""
        context.setdefault("lake", lake_uri(self._ctx.settings.lake_url))
        hooks.dispatch(event, {k: v for k, v in context.items() if v is not None}, self._ctx.settings.hooks)


class Context:
    """Settings, lake, catalog, identity, clock and the event sink of one user's session."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        home: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
        user: str | None = None,
    ) -> None:
        self.settings = settings or load_settings(home)
        self.clock = clock
        self.user = user or current_user()
        self.host = HOST
        self.events = Events(self)
        self._lake: Lake | None = None
        self._catalog: Catalog | None = None
        # damaged lake documents met while indexing, by (dataset, tag or commit id): what
        # resolving exactly that name reports instead of "no such tag or commit"
        self.lake_problems: dict[tuple[str, str], CachehubError] = {}

    # -- identity and clock ------------------------------------------------------------------
    def now(self) -> float:
        return self.clock()

    @staticmethod
    def now_iso() -> str:
        return now_iso()

    # -- the lake and the catalog, opened on first use ---------------------------------------
    @property
    def lake(self) -> Lake:
        if self.settings.offline:
            raise LakeError(
                "CACHEHUB_OFFLINE=1: this needs the lake, which is never contacted offline; unset CACHEHUB_OFFLINE "
                "(resolve, use and path of cached commits work offline)"
            )
        if self._lake is None:
            from cachehub.backends import open_backend

            s = self.settings
            backend = open_backend(s.lake_url, endpoint_url=s.endpoint_url, region=s.region, credentials=s.credentials)
            lake = Lake(backend, manifest_cache=s.manifest_cache)
            lake.check_readable()  # refuse a lake written by a newer cachehub, once per process
            self._lake = lake
        return self._lake

    @property
    def catalog(self) -> Catalog:
        """The catalog, refusing one that indexes a different lake than the configured one."""
        if self._catalog is None:
            self._catalog = self.open_catalog()
        return self._catalog

    def open_catalog(self, *, any_lake: bool = False) -> Catalog:
        """Open the catalog file; unless ``any_lake``, refuse one indexing another lake."""
        if self._catalog is not None:
            return self._catalog
        catalog = Catalog(self.settings.catalog_path)
        indexed = catalog.get_meta("lake")
        wanted = lake_identity(self.settings.lake_url)
        if indexed is None:
            catalog.set_meta("lake", wanted)
        elif indexed != wanted and not any_lake:
            catalog.close()
            raise ConfigError(
                f"the catalog {self.settings.catalog_path} indexes the lake {indexed}, not {wanted}; "
                "run cachehub catalog rebuild to re-index for this lake, or use another CACHEHUB_HOME"
            )
        self._catalog = catalog
        return catalog

    def manifest(self, manifest_id: str) -> Path:
        """A verified local copy of a manifest, fetched from the lake once."""
        return self.lake.manifest(manifest_id)

    def manifest_source(self) -> ManifestSource:
        """``manifest`` as a source for restoring a site's lost copy (``SiteStore.manifest_entries``)."""
        return self.manifest

    # -- sites -------------------------------------------------------------------------------
    def site(self, name: str | None = None) -> Site:
        return self.settings.site(name)

    def store(self, site: str | None = None, *, check: bool = True) -> SiteStore:
        """The store of the named (or default) site; SiteNotFoundError names the fix.

        With ``check`` (the default) its root must carry its marker: a missing root raises
        SiteMissingError naming the mount (the embedded default site is laid out instead).
        """
        store = SiteStore(self.settings.site(site))
        if check and not store.exists():
            if self.settings.creates_on_use(store.site):
                store.create(by=self.user)
            else:
                store.check()
        return store

    def scratch(self, name: str) -> Path:
        """A fresh, process-unique path under this home's ``tmp/`` (what dead processes left there
        is swept first): plans and listings too big for memory, never on the site."""
        tmp_dir = self.settings.tmp_dir
        tmp_dir.mkdir(parents=True, exist_ok=True)
        sweep_dead_entries(tmp_dir)
        return tmp_dir / f"{name}.{unique_suffix()}"

    def stores(self) -> list[SiteStore]:
        """Every configured site's store, roots unchecked (a caller skips those not laid out)."""
        return [SiteStore(s) for s in self.settings.sites.values()]

    def with_site(self, site: Site) -> None:
        """Use ``site`` (added or changed) for the rest of this context's life."""
        self.settings = replace(self.settings, sites={**self.settings.sites, site.name: site})

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._catalog is not None:
            self._catalog.close()
            self._catalog = None
        if self._lake is not None:
            self._lake.close()
            self._lake = None
