"""Byte quantities: parsing budgets such as "512MiB" or "2GB" and printing sizes for people."""
from __future__ import annotations

import re

from .errors import BadBudget

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str, *, what: str = "budget") -> int:
    """Bytes from an int, or from a string like "512MiB", "1.5GiB", "2GB" (accelerate's `max_memory` style:
    KB/MB/GB are powers of 10, KiB/MiB/GiB powers of 2)."""
    if isinstance(value, bool):
        raise BadBudget(f"{what} must be a byte count or a string such as '512MiB', not {value!r}")
    if isinstance(value, (int, float)):
        nbytes = int(value)
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise BadBudget(
                f"{what} {value!r} does not parse; write a number of bytes or a number with a unit "
                f"such as '512MiB', '1.5GiB' or '2GB' (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
        nbytes = int(float(match.group(1)) * _UNITS[unit])
    else:
        raise BadBudget(f"{what} must be a byte count or a string such as '512MiB', not {type(value).__name__}")
    if nbytes <= 0:
        raise BadBudget(f"{what} must be positive, got {value!r}")
    return nbytes


def fmt_bytes(nbytes: int | float) -> str:
    """'1.21 GiB', '512.0 MiB', '3.0 KiB', '17 B'."""
    nbytes = float(nbytes)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} B"


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment
