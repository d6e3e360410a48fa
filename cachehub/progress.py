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
