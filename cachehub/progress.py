"""Progress reporting for long work, decoupled from any terminal library.

The library calls a ``Progress``; the CLI passes one that draws a rich progress bar, the
Python API passes none (``NULL``) unless the caller wants to observe.
"""

from __future__ import annotations


class Progress:
    """Receives the phases of a long operation. Subclass and override what you need."""

    def start(self, phase: str, *, total_files: int | None = None, total_bytes: int | None = None) -> None:
        """A new phase begins (``hash``, ``upload``, ``fetch``, ``link``...)."""

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        """Some files and bytes of the current phase are done."""

    def finish(self) -> None:
        """The current phase is over."""


NULL = Progress()


class LineProgress(Progress):
    """Progress as plain lines, for logs that are not a terminal (Kubernetes, Slurm, CI): every
    ``every`` seconds one line with files, bytes, rate and ETA, and one when a phase ends::

        fetch  41,200/600,000 files  17.2 GB of 250.0 GB  412.6 MB/s  ETA 9m 24s
        fetch  done: 600,000 files, 250.0 GB in 10m 5s (413.0 MB/s)
    """

    def __init__(self, stream: object = None, *, every: float = 5.0) -> None:
        import sys
        import time

        self._stream = stream if stream is not None else sys.stderr
        self._every = every
        self._clock = time.monotonic
        self._phase: str | None = None

    def start(self, phase: str, *, total_files: int | None = None, total_bytes: int | None = None) -> None:
        self._phase, self._total_files, self._total_bytes = phase, total_files, total_bytes
        self._files = self._bytes = 0
        self._started = self._last = self._clock()

    def advance(self, files: int = 0, nbytes: int = 0) -> None:
        if self._phase is None:
            return
        self._files += files
        self._bytes += nbytes
        now = self._clock()
        if now - self._last >= self._every:
            self._last = now
            self._write(self._line(now))

    def finish(self) -> None:
        if self._phase is None:
            return
        elapsed = self._clock() - self._started
        if self._files or self._bytes:
            rate = f" ({_size(self._bytes / elapsed)}/s)" if elapsed > 0 and self._bytes else ""
            self._write(f"{self._phase:>6}  done: {self._files:,} files, {_size(self._bytes)} in {_span(elapsed)}{rate}")
        self._phase = None

    def _line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-6)
        files = f"{self._files:,}/{self._total_files:,}" if self._total_files else f"{self._files:,}"
        volume = _size(self._bytes) + (f" of {_size(self._total_bytes)}" if self._total_bytes else "")
        rate = self._bytes / elapsed
        eta = ""
        if self._total_bytes and rate > 0 and self._bytes:
            eta = f"  ETA {_span((self._total_bytes - self._bytes) / rate)}"
        elif self._total_files and self._files:
            eta = f"  ETA {_span((self._total_files - self._files) * elapsed / self._files)}"
        return f"{self._phase:>6}  {files} files  {volume}  {_size(rate)}/s{eta}"

    def _write(self, line: str) -> None:
        try:
            self._stream.write(line + "\n")  # type: ignore[attr-defined]
            self._stream.flush()  # type: ignore[attr-defined]
        except (OSError, ValueError):
            pass  # a closed log must not fail the work


def _size(n: float) -> str:
    from .fsutil import human_bytes

    return human_bytes(int(n))


def _span(seconds: float) -> str:
    s = int(max(0, seconds))
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 60}m {s % 60}s" if s >= 60 else f"{s}s"
