"""The transfer engine: many requests in flight from one event loop, bounded in memory.

Both push (uploads) and cache (downloads) hand it a plain iterator of work items and one
coroutine per item; it keeps ``jobs`` of them running, pulls the next item only when a slot
frees up (so a million-file plan is never materialised as tasks), and stops at the first
error after letting the running ones finish or cancelling them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def run_bounded(items: Iterable[T], worker: Callable[[T], Awaitable[None]], *, jobs: int) -> None:
    """Run ``worker(item)`` for every item with at most ``jobs`` in flight; re-raise the first error."""
    iterator = iter(items)
    running: set[asyncio.Task[None]] = set()
    error: BaseException | None = None
    try:
        while True:
            while error is None and len(running) < jobs:
                item = next(iterator, _END)
                if item is _END:
                    break
                running.add(asyncio.ensure_future(worker(item)))  # type: ignore[arg-type]
            if not running:
                break
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is not None and error is None:
                    error = exc
            if error is not None:
                break
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    if error is not None:
        raise error


_END = object()


def run(items: Iterable[T], worker: Callable[[T], Awaitable[None]], *, jobs: int) -> None:
    """Synchronous entry point: run the engine on a fresh event loop."""
    asyncio.run(run_bounded(items, worker, jobs=jobs))
