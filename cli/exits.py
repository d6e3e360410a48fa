"""How every ``cachehub`` process ends, for the full CLI and the fast ``cachehub path`` alike.

Kept free of Typer so the fast path can use it without the import cost.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable


def arm_deadline() -> int | None:
    """``CACHEHUB_COMMAND_TIMEOUT``: end the whole command after that long.

    The per-request deadlines (CACHEHUB_REQUEST_TIMEOUT, CACHEHUB_RETRY_TIMEOUT) bound each lake
    request; this one bounds the command, for jobs that must not wait on a lake for ever. The
    command is ended as a crash would end it (exit 11): everything cachehub publishes is
    crash-safe, so a re-run resumes. Returns an exit code if the setting itself is invalid.
    """
    raw = os.environ.get("CACHEHUB_COMMAND_TIMEOUT")
    if not raw:
        return None
    from cachehub.errors import ConfigError
    from cachehub.policy import parse_duration

    try:
        seconds = parse_duration(raw)
    except (ConfigError, ValueError):
        print(f"cachehub: error: CACHEHUB_COMMAND_TIMEOUT={raw!r} is not a duration (e.g. 90s, 10m, 2h)", file=sys.stderr)
        return 13

    def expire() -> None:
        try:
            sys.stderr.write(
                f"cachehub: error: the command ran past its deadline of {raw} (CACHEHUB_COMMAND_TIMEOUT) and was ended; "
                "nothing half-done was published, re-run to resume\n"
            )
            sys.stderr.flush()
        finally:
            os._exit(11)

    if seconds > 0:
        timer = threading.Timer(seconds, expire)
        timer.daemon = True
        timer.start()
    return None


def leave(code: int, closers: Iterable[Callable[[], None]] = ()) -> None:
    """Close what the command opened, then exit with ``code``.

    With an object-store lake, obstore's Rust threads may still hold requests that an error cut
    short; if one finished while the interpreter was tearing down, it would call into a Python
    that is gone and abort the process (SIGABRT, exit 134). So after closing and flushing, such
    a process ends with ``os._exit`` and skips that teardown: every file cachehub writes is
    already durable (written, fsynced, renamed) by then. Ctrl-C is ignored from here on.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for close in closers:
        try:
            close()
        except Exception:  # noqa: BLE001, S110 - closing is best effort on the way out
            pass
    from cachehub.backends import runtime_started

    if not runtime_started():
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (cachehub ... | head)
            pass
    os._exit(code)
