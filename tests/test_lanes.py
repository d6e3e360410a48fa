"""The transfer engine: bounded concurrency, laziness, first error wins."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from cachehub.lanes import run


def test_runs_every_item_with_bounded_concurrency() -> None:
    active, peak, seen = [0], [0], []

    async def work(i: int) -> None:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        await asyncio.sleep(0.001 * (i % 3))
        seen.append(i)
        active[0] -= 1

    run(range(200), work, jobs=8)
    assert sorted(seen) == list(range(200)) and peak[0] == 8


def test_first_error_stops_the_rest_and_the_iterator_is_lazy() -> None:
    pulled = []

    def items():  # an endless plan: it must not be materialised
        for i in itertools.count():
            pulled.append(i)
            yield i

    async def work(i: int) -> None:
        await asyncio.sleep(0)
        if i == 50:
            raise ValueError("object 50 is damaged")

    with pytest.raises(ValueError, match="damaged"):
        run(items(), work, jobs=4)
    assert len(pulled) < 100
