"""Hooks: code that runs before and after cachehub's state changes.

Two kinds, called in this order for every event:

* Python entry points in the group ``cachehub.hooks``: each loads to a callable
  ``hook(event: str, context: dict) -> None``; raising aborts a ``pre_*`` event;
* shell commands from the configuration::

      [hooks]
      pre_push = "scripts/check-licence.sh"
      post_cache = ["notify-send cached", "logger cachehub"]

  run with ``sh -c``; the context is in ``CACHEHUB_HOOK_*`` environment variables and, as
  JSON, on stdin. A non-zero exit aborts a ``pre_*`` event, with the command's output as the
  message.

Events: ``pre_``/``post_`` + ``push``, ``cache``, ``evict``, ``snapshot``, ``restore``,
``resolve``, ``run``. A failing ``post_*`` hook is reported as a warning, never undone.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable

from .errors import CachehubError

log = logging.getLogger("cachehub.hooks")
EVENTS = tuple(f"{when}_{what}" for what in ("push", "cache", "evict", "snapshot", "restore", "resolve", "run") for when in ("pre", "post"))
GROUP = "cachehub.hooks"


class HookError(CachehubError):
    """A pre-hook refused the operation; nothing was changed."""

    exit_code = 16


_entry_points: list[tuple[str, Callable[[str, dict], None]]] | None = None


def python_hooks() -> list[tuple[str, Callable[[str, dict], None]]]:
    """The installed ``cachehub.hooks`` entry points (loaded once per process)."""
    global _entry_points
    if _entry_points is None:
        from importlib.metadata import entry_points

        loaded = []
        for ep in entry_points(group=GROUP):
            try:
                loaded.append((ep.name, ep.load()))
            except Exception as exc:  # a broken plugin must not take cachehub down
                log.warning("hook entry point %s failed to load: %s", ep.name, exc)
        _entry_points = loaded
    return _entry_points


def reset() -> None:
    """Forget loaded entry points (tests install new ones)."""
    global _entry_points
    _entry_points = None


def dispatch(event: str, context: dict, shell: dict[str, list[str]]) -> None:
    """Run every hook for ``event``; a pre-hook failure raises HookError."""
    assert event in EVENTS, event
    commands = shell.get(event, [])
    hooks = python_hooks()
    if not commands and not hooks:
        return
    pre = event.startswith("pre_")
    for name, fn in hooks:
        try:
            fn(event, dict(context))
        except Exception as exc:
            if pre:
                raise HookError(f"{event} hook {name} refused: {exc}", hook=name, event=event) from exc
            log.warning("%s hook %s failed: %s", event, name, exc)
    for command in commands:
        env = {**os.environ, "CACHEHUB_HOOK_EVENT": event}
        for key, value in context.items():
            env[f"CACHEHUB_HOOK_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
        result = subprocess.run(
            ["sh", "-c", command], input=json.dumps({"event": event, **context}), env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            message = (result.stderr.strip() or result.stdout.strip() or f"exit {result.returncode}").splitlines()[-1]
            if pre:
                raise HookError(f"{event} hook `{command}` refused: {message}", hook=command, event=event)
            log.warning("%s hook %r failed: %s", event, command, message)
