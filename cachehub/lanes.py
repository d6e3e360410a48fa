"""Bounded lanes on one event loop: many requests in flight, bounded in memory (push and the download engine).

Both push (uploads) and cache (downloads) hand it a plain iterator of work items and one
coroutine per item. ``jobs`` lanes pull items from the shared iterator one at a time (so a
million-file plan is never materialised as tasks) and run them; the first error stops every
lane and is re-raised.

Lanes rather than a task per item: waiting on a growing set of tasks costs O(jobs) per
completion, which at 20,000 small objects was a measurable share of the client's CPU.

The loop is uvloop's where it is installed (a dependency on Linux and macOS): every obstore
request completes on a Rust thread and wakes the loop with ``call_soon_threadsafe``, and
uvloop does that, and the rest of the per-request bookkeeping, in about 25% less CPU than the
standard loop (bench/, docs/performance.md). ``CACHEHUB_EVENT_LOOP=asyncio`` forces the
standard loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


async def run_bounded(items: Iterable[T], worker: Callable[[T], Awaitable[None]], *, jobs: int) -> None:
    """Run ``worker(item)`` for every item with at most ``jobs`` in flight; re-raise the first error."""
    iterator = iter(items)
    failed = False

    async def lane() -> None:
        nonlocal failed
        # next() is never awaited, so lanes on one event loop never race on the iterator
        for item in iterator:
            if failed:
                return
            try:
                await worker(item)
            except BaseException:
                failed = True
                raise

    lanes = [asyncio.ensure_future(lane()) for _ in range(max(1, jobs))]
    done, pending = await asyncio.wait(lanes, return_when=asyncio.FIRST_EXCEPTION)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    errors = [t.exception() for t in lanes if t.done() and not t.cancelled()]  # retrieves every one
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh event loop (uvloop's when available)."""
    if os.environ.get("CACHEHUB_EVENT_LOOP", "auto") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def run(items: Iterable[T], worker: Callable[[T], Awaitable[None]], *, jobs: int) -> None:
    """Synchronous entry point: run the engine on a fresh event loop."""
    run_loop(run_bounded(items, worker, jobs=jobs))
