"""The ``cachehub`` console script: a fast path for ``cachehub path``, Typer for the rest.

``cachehub path NAME@REF [--site S]`` runs inside shell substitutions before every training
job, so it skips importing Typer (and what Typer imports): it must answer in well under
150 ms. Any other arguments, or any option it does not know, go to the full CLI.
"""

from __future__ import annotations

import os
import sys


def _fast_path(argv: list[str]) -> int | None:
    """Handle ``path REF [--site S|-s S|--site=S]``; None means "not for me"."""
    if len(argv) < 2 or argv[0] != "path":
        return None
    ref, site, rest = None, None, argv[1:]
    while rest:
        arg = rest.pop(0)
        if arg in ("--site", "-s") and rest:
            site = rest.pop(0)
        elif arg.startswith("--site="):
            site = arg.split("=", 1)[1]
        elif not arg.startswith("-") and ref is None:
            ref = arg
        else:
            return None  # --help, --json, typos: let the full CLI answer
    if ref is None:
        return None
    from cachehub.access import resolve
    from cachehub.context import Context
    from cachehub.errors import CachehubError

    from .exits import arm_deadline

    invalid = arm_deadline()
    if invalid is not None:
        return invalid
    try:
        with Context() as ctx:  # the worker itself: the facade would import every other worker
            print(resolve(ctx, ref, site=site))
    except CachehubError as exc:
        if os.environ.get("CACHEHUB_DEBUG") == "1":
            raise
        print(f"cachehub: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, ValueError) as exc:
        if os.environ.get("CACHEHUB_DEBUG") == "1":
            raise
        print(f"cachehub: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cachehub: interrupted; re-run to resume", file=sys.stderr)
        return 130
    return 0


def main() -> None:
    code = _fast_path(sys.argv[1:])
    if code is not None:
        from .exits import leave

        leave(code)  # the context is closed; leave skips teardown if obstore ran
    from .main import main as full

    full()


if __name__ == "__main__":
    main()
