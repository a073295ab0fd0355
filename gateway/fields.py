"""Field types shared by the tag map's sections (devices, tags, rules, derived values)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(value: object) -> object:
    """``500ms``, ``1s``, ``2m``, ``1h`` or a number of seconds -> seconds as float."""
    if isinstance(value, bool):
        raise ValueError("a duration, such as 500ms, 1s, 2m")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return float(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"{value!r} is not a duration (use e.g. 500ms, 1s, 2m)")


Duration = Annotated[float, BeforeValidator(duration)]
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
TagName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)
