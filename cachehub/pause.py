"""Pause points: make a race between processes deterministic, in tests, only when asked.

``point("gc.before-manifest-delete")`` does nothing unless ``CACHEHUB_PAUSE`` names that point:
``CACHEHUB_PAUSE="gc.before-manifest-delete,cache.after-lock@/tmp/handshake"``. Then the process
creates ``/tmp/handshake/<point>.reached`` and waits until ``/tmp/handshake/<point>.go`` exists
(at most ``CACHEHUB_PAUSE_TIMEOUT`` seconds, default 120). A test starts one process paused at a
point, runs the other side of the race to completion, then lets the first go on: the
interleaving is the one the test chose, every time, with no sleep-and-hope.

Outside tests the cost is one environment lookup per point.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def point(name: str) -> None:
    """Wait here if ``CACHEHUB_PAUSE`` names this point (see the module docstring)."""
    spec = os.environ.get("CACHEHUB_PAUSE")
    if not spec:
        return
    names, _, directory = spec.rpartition("@")
    if name not in names.split(","):
        return
    where = Path(directory)
    (where / f"{name}.reached").touch()
    deadline = time.monotonic() + float(os.environ.get("CACHEHUB_PAUSE_TIMEOUT", "120"))
    while not (where / f"{name}.go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"pause point {name}: nobody created {where / (name + '.go')}")
        time.sleep(0.005)
