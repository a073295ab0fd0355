"""Report by exception: which readings of a tag go out in telemetry, and which are left out.

A tag reports by exception when the tag map gives it a ``deadband`` or ``deadband_percent``, or a
``max_silence`` (its own, its asset's or its device's); every other tag is sent every time it is read.
Each such tag gets a :class:`Deadband` when the pipeline is built: its band (``deadband_percent`` is
turned into an absolute band here, once), its max silence and what it last reported. Deciding on a
reading is then a handful of comparisons, with no allocation unless it is reported.

A reading of a tag with a deadband is reported when (in this order)

1. nothing of the tag was reported yet;
2. its quality, or the reason of a quality that is not good, differs from the last reported one
   (so a bad -> good transition always goes out, and so does a tag going bad);
3. the wall clock has reached the next multiple of ``max_silence`` after the last report (every full
   minute for ``1m``), or stepped back before the last report: a subscriber can tell an unchanged
   value from a dead gateway. No tag stays silent longer than ``max_silence`` (and one poll), and
   since the multiples are the same for every tag, the unchanged tags of an asset go out together,
   in one message, rather than one by one as their own timers run out;
4. its value differs from the last reported value: by more than the band for numbers (int or float,
   not bool), at all for anything else (bool, text, an enum's name).

Otherwise it is left out. The band is measured from the last *reported* value, not the last read one,
so a slow drift is reported once it adds up to more than the band, and the last reported value never
differs from the current one by more than the band while the quality stays the same.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import Reading
    from .tagmap import TagMap

_NUMBER = frozenset((int, float))  # bool is neither: True and 1 are not a move of one


class Deadband:
    """One tag's report-by-exception parameters and its last report."""

    __slots__ = ("band", "due", "last", "max_silence", "sent")

    def __init__(self, band: float = 0.0, max_silence: float = math.inf) -> None:
        if not (band >= 0 and math.isfinite(band)):
            raise ValueError(f"band must be a finite number >= 0, not {band}")
        if not max_silence > 0:
            raise ValueError(f"max_silence must be > 0, not {max_silence}")
        self.band = band
        self.max_silence = max_silence
        self.last: Reading | None = None  # the last reading reported
        self.sent = 0.0  # when it was reported (the commit's wall time)
        self.due = 0.0  # the multiple of max_silence after it: sent again then, even unchanged

    def offer(self, r: Reading, now: float) -> bool:
        """Whether ``r`` goes out in telemetry; if so it becomes the last reported reading.
        ``now``: the commit's wall time (readings of one commit share it)."""
        last = self.last
        if last is not None and last.quality is r.quality and self.sent <= now < self.due \
                and last.reason == r.reason:
            v, lv = r.value, last.value
            if v == lv or (type(v) in _NUMBER and type(lv) in _NUMBER and abs(v - lv) <= self.band):  # type: ignore[operator]
                return False
        self.last = r
        self.sent = now
        self.due = (now // self.max_silence + 1.0) * self.max_silence  # inf without a max_silence
        return True

    def __repr__(self) -> str:
        return f"Deadband(band={self.band!r}, max_silence={self.max_silence!r})"


def deadbands(tag_map: TagMap) -> dict[tuple[str, str], Deadband]:
    """``(asset id, tag name) -> Deadband`` for every tag and derived value that reports by exception.

    The band is the tag's ``deadband``, or ``deadband_percent`` of its range ``max - min``, or 0 (any
    change) when only a ``max_silence`` applies. ``max_silence`` is the tag's own, else its asset's,
    else its device's. A derived value reports by exception when its asset has a ``max_silence``.
    """
    devices = {d.id: d for d in tag_map.devices}
    out: dict[tuple[str, str], Deadband] = {}
    for asset in tag_map.assets:
        for name, tag in asset.tags.items():
            silence = _first(tag.max_silence, asset.max_silence, devices[tag.device].max_silence)
            band = tag.deadband
            if band is None and tag.deadband_percent is not None:
                assert tag.min is not None and tag.max is not None  # the tag map requires them
                band = tag.deadband_percent / 100.0 * (tag.max - tag.min)
            if band is not None or silence is not None:
                out[(asset.id, name)] = Deadband(band or 0.0, math.inf if silence is None else silence)
        if asset.max_silence is not None:
            for name in asset.derived:
                out[(asset.id, name)] = Deadband(0.0, asset.max_silence)
    return out


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


__all__ = ["Deadband", "deadbands"]
