"""Parsing of the human units used by profiles and command lines: durations, rates, key lists.

No Locust and no Ray here: the report, the capacity model and the profile model all use it.
"""

from __future__ import annotations

import re

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hr": 3600.0, "hour": 3600.0}


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``90``, ``"90s"``, ``"2m"``, ``"1h30m"``, ``"1.5h"`` or ``"500ms"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value!r}")
        return float(value)
    text = str(value).strip().replace(" ", "")
    if not text:
        raise ValueError("empty duration")
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None or match.end() == pos:
            raise ValueError(f"not a duration: {value!r} (use e.g. 90, 90s, 2m, 1h30m)")
        total += float(match.group(1)) * _UNIT_SECONDS[(match.group(2) or "s").lower()]
        pos = match.end()
    return total


def parse_rate(value: str | int | float) -> float:
    """Events per second from ``0.5`` (per second), ``"30/min"``, ``"600/h"`` or ``"2/s"``."""
    if isinstance(value, bool):
        raise ValueError(f"not a rate: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a rate cannot be negative: {value!r}")
        return float(value)
    text = str(value).strip().replace(" ", "").lower()
    count, sep, unit = text.partition("/")
    try:
        number = float(count)
    except ValueError:
        raise ValueError(f"not a rate: {value!r} (use e.g. 600/h, 10/min, 0.5/s)") from None
    if number < 0:
        raise ValueError(f"a rate cannot be negative: {value!r}")
    if not sep:
        return number
    if unit not in _RATE_UNITS:
        raise ValueError(f"rate {value!r}: unit must be /s, /min or /h")
    return number / _RATE_UNITS[unit]


def format_duration(seconds: float) -> str:
    """``75`` -> ``"1m15s"``; sub-minute values keep one decimal."""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds != int(seconds) else f"{int(seconds)}s"
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    out = f"{hours}h" if hours else ""
    out += f"{minutes}m" if minutes else ""
    out += f"{rest}s" if rest else ""
    return out


def parse_keys(text: str | None) -> dict[str, str]:
    """``"tenantA=KEY,tenantB=KEY"`` -> mapping. A single value with no ``=`` maps to ``"*"``
    (the same key for every tenant of the profile)."""
    if not text:
        return {}
    keys: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, key = part.partition("=")
        if not sep:
            if len([p for p in text.split(",") if p.strip()]) != 1:
                raise ValueError("--keys: use NAME=KEY pairs separated by commas (or one bare KEY for all tenants)")
            return {"*": name}
        name, key = name.strip(), key.strip()
        if not name or not key:
            raise ValueError(f"--keys: {part!r} is not NAME=KEY")
        keys[name] = key
    return keys


def parse_mapping(text: str | None, *, what: str) -> dict[str, float]:
    """``"sampling=19.1,decode=3.4"`` -> ``{"sampling": 19.1, "decode": 3.4}``."""
    out: dict[str, float] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, number = part.partition("=")
        if not sep:
            raise ValueError(f"{what}: {part!r} is not NAME=NUMBER")
        try:
            out[name.strip()] = float(number)
        except ValueError:
            raise ValueError(f"{what}: {number!r} is not a number") from None
    return out
