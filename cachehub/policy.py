"""Site policy values and their parsing: durations ("1d", "10m"), sizes ("2T"), fractions ("80%").

Pure functions; errors are ConfigError naming the accepted forms.
"""

from __future__ import annotations

import re

from .errors import ConfigError

DEFAULT_TTL = 86400.0  # one day idle
DEFAULT_LOW_WATERMARK = 0.8
DEFAULT_MIN_FREE = 0.0  # disabled unless set
DEFAULT_GRACE = 600.0  # a bare resolve() protects an entry this long
DEFAULT_LEASE_TIMEOUT = 300.0

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``90``, ``"90s"``, ``"10m"``, ``"12h"``, ``"1d"``, ``"2w"``; ``0`` disables."""
    if isinstance(text, (int, float)):
        return float(text)
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"invalid duration {text!r}: use e.g. 90s, 10m, 12h, 1d, 2w or 0 to disable")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


def parse_size(text: str | int) -> int:
    """Bytes from ``"500G"``, ``"2T"``, ``"1.5TiB"``, ``"1048576"`` (K/M/G/T/P are powers of 1024)."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise ConfigError(f"invalid size {text!r}: use e.g. 500G, 2T, 1.5TiB or a number of bytes")
    unit = (match.group(2) or "B").upper()[0]
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}[unit]
    return int(float(match.group(1)) * 1024**power)


def parse_fraction(text: str | float) -> float:
    """A fraction in [0, 1] from ``"80%"`` or ``0.8``."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        stripped = text.strip()
        try:
            value = float(stripped[:-1]) / 100 if stripped.endswith("%") else float(stripped)
        except ValueError:
            raise ConfigError(f"invalid fraction {text!r}: use e.g. 80% or 0.8") from None
    if not 0 <= value <= 1:
        raise ConfigError(f"invalid fraction {text!r}: must be between 0% and 100%")
    return value


def format_duration(seconds: float) -> str:
    if seconds <= 0:
        return "0"
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def format_size(n: int | None) -> str | None:
    if n is None:
        return None
    for unit, power in (("P", 5), ("T", 4), ("G", 3), ("M", 2), ("K", 1)):
        if n % 1024**power == 0:
            return f"{n // 1024**power}{unit}"
    return str(n)
