"""Engineering value -> raw device value: the inverse of ``gateway.model.Transform`` (pure, no I/O).

A tag reads ``raw * scale + offset`` (or an enum name for a code); writing runs that backwards and
checks that the result is something the device type can hold. Every value that cannot be written
raises ``EncodeError`` (a ``ValueError``) with a message meant for the operator who sent it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

from gateway.model import Transform

from .modbus.codec import EncodeError

Kind = Literal["bool", "int", "float", "string"]

__all__ = ["EncodeError", "Kind", "check_int_range", "to_raw"]


def to_raw(value: object, transform: Transform, kind: Kind) -> bool | int | float | str:
    """The raw device value that reads back as ``value``; ``kind`` is what the device type holds."""
    if transform.enum is not None:
        return _enum_code(value, transform.enum)
    if kind == "bool":
        if not isinstance(value, bool):
            raise EncodeError(f"needs true or false, got {_show(value)}")
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise EncodeError(f"needs a string, got {_show(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EncodeError(f"needs a number, got {_show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise EncodeError(f"{value} is not a finite number")
    if transform.scale == 1.0 and transform.offset == 0.0:
        return _plain_number(value, kind)
    return _unscale(value, transform.scale, transform.offset, kind)


def _plain_number(value: int | float, kind: Kind) -> int | float:
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise EncodeError(f"{value!r} is not a whole number")
        return int(value)
    try:
        return float(value)
    except OverflowError:
        raise EncodeError(f"{value!r} is out of range") from None


def _unscale(value: int | float, scale: float, offset: float, kind: Kind) -> int | float:
    """``(value - offset) / scale``; for an integer type it must land on a whole raw step."""
    if scale == 0.0:
        raise EncodeError("the tag's scale is 0: no raw value reads back as a given value")
    try:
        exact = (value - offset) / scale
    except OverflowError:
        raise EncodeError(f"{value!r} is out of range") from None
    if not math.isfinite(exact):
        raise EncodeError(f"{value!r} is out of range (raw value {exact})")
    if kind == "float":
        return exact
    code = round(exact)
    nearest = code * scale + offset
    if not math.isclose(nearest, value, rel_tol=1e-9, abs_tol=abs(scale) * 1e-6):
        raise EncodeError(f"{value!r} is not a step of the tag's resolution {scale:g} "
                          f"(offset {offset:g}); the nearest value is {nearest:.10g}")
    return code


def check_int_range(raw: int, lo: int, hi: int, type_name: str, transform: Transform) -> None:
    """Raise EncodeError when ``raw`` is outside ``lo..hi``, naming the range in engineering units."""
    if lo <= raw <= hi:
        return
    scale, offset = transform.scale, transform.offset
    if transform.enum is not None or (scale == 1.0 and offset == 0.0):
        raise EncodeError(f"{raw} is out of range for {type_name} ({lo}..{hi})")
    low, high = sorted((lo * scale + offset, hi * scale + offset))
    raise EncodeError(f"{raw * scale + offset:.10g} is out of range for {type_name} with scale {scale:g} "
                      f"and offset {offset:g} ({low:.10g}..{high:.10g})")


def _enum_code(value: object, enum: Mapping[int, str]) -> int:
    names = {name: code for code, name in enum.items()}
    if isinstance(value, str) and value in names:
        return names[value]
    raise EncodeError(f"needs one of {', '.join(names)}; got {_show(value)}")


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"
