"""A rich progress bar for the library's Progress protocol (stderr, only on a terminal)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cachehub.fsutil import human_bytes
from cachehub.progress import Progress as BaseProgress


class RichProgress(BaseProgress):
    """Files done of total, bytes done, throughput and ETA for each phase."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task = None
        self._bytes = 0
        self._total_bytes: int | None = None
        self._started = 0.0

    def start(self, phase: str, *, total_files: int | None = None, total_bytes: int | None = None) -> None:
        self._bar = Progress(
            TextColumn(f"[bold]{phase:>7}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files  {task.fields[volume]}  {task.fields[rate]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(phase, total=total_files, volume="", rate="")
        self._bytes = 0
        self._total_bytes = total_bytes
        self._started = time.monotonic()

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        if self._bar is None or self._task is None:
            return
        self._bytes += nbytes
        elapsed = max(time.monotonic() - self._started, 1e-6)
        total = f" of {human_bytes(self._total_bytes)}" if self._total_bytes else ""
        self._bar.update(
            self._task,
            advance=files,
            volume=f"{human_bytes(self._bytes)}{total}",
            rate=f"{human_bytes(self._bytes / elapsed)}/s",
        )

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
