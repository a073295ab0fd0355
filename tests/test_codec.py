"""gateway/codec.py's hot payloads (telemetry, state) against a plain reference: the same bytes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import codec
from gateway.model import Quality, Reading, iso_ms

from .helpers import validate


def _reference_reading(r: Reading) -> dict[str, object]:
    out: dict[str, object] = {
        "tag": r.tag,
        "value": r.value,
        "quality": r.quality.value,
        "source_ts": iso_ms(r.source_ts) if r.source_ts is not None else None,
        "ts": iso_ms(r.ts),
    }
    if r.quality is not Quality.GOOD:
        out["reason"] = r.reason
    return out


def reference_telemetry(*, gateway_id: str, boot_id: str, seq: int, asset_id: str,
                        readings: Iterable[Reading]) -> bytes:
    return orjson.dumps({"gateway_id": gateway_id, "boot_id": boot_id, "seq": seq, "asset_id": asset_id,
                         "readings": [_reference_reading(r) for r in readings]})


def reference_state(*, asset_id: str, asset_name: str, kind: str, ts: float, latest: Mapping[str, Reading]) -> bytes:
    return orjson.dumps({
        "asset_id": asset_id, "asset_name": asset_name, "kind": kind, "ts": iso_ms(ts),
        "values": {tag: r.value for tag, r in latest.items()},
        "quality": {tag: r.quality.value for tag, r in latest.items()},
        "reasons": {tag: r.reason for tag, r in latest.items() if r.quality is not Quality.GOOD},
    })


_TS = st.sampled_from([1.7e9, 1.7e9 + 0.0005, 1.7e9 + 0.9999, 1_700_000_123.456]) | st.floats(0, 4e9)
_VALUES = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False,
                                                                                   allow_infinity=False) | st.text()


@st.composite
def _readings(draw: st.DrawFn) -> list[Reading]:
    shared = draw(_TS)  # most readings of a poll share ts; some do not
    out = []
    for i in range(draw(st.integers(0, 12))):
        quality = draw(st.sampled_from(list(Quality)))
        out.append(Reading(
            "asset-1", draw(st.sampled_from(["status", "t1", "t2", f"x{i}"])), draw(_VALUES), quality,
            None if quality is Quality.GOOD and draw(st.booleans()) else draw(st.none() | st.text(max_size=8)),
            draw(st.none() | st.just(shared) | _TS), draw(st.just(shared) | _TS),
        ))
    return out


@settings(max_examples=300, deadline=None)
@given(readings=_readings(), seq=st.integers(1, 2**40))
def test_telemetry_bytes_equal_the_reference(readings: list[Reading], seq: int) -> None:
    kw = dict(gateway_id="edge-01", boot_id="b" * 32, seq=seq, asset_id="asset-1")
    assert codec.telemetry(**kw, readings=readings) == reference_telemetry(**kw, readings=readings)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(readings=_readings(), ts=_TS)
def test_state_bytes_equal_the_reference(readings: list[Reading], ts: float) -> None:
    latest = {r.tag: r for r in readings}
    kw = dict(asset_id="asset-1", asset_name="Asset 1", kind="station", ts=ts, latest=latest)
    assert codec.state(**kw) == reference_state(**kw)  # type: ignore[arg-type]


def test_telemetry_table() -> None:
    readings = [
        Reading("f-1", "temp", 36.7, Quality.GOOD, None, None, 1.7e9),
        Reading("f-1", "status", "running", Quality.GOOD, None, 1.7e9 - 1.5, 1.7e9),
        Reading("f-1", "flow", None, Quality.BAD, "not a finite number (nan)", None, 1.7e9 + 0.25),
        Reading("f-1", "code", 7, Quality.UNCERTAIN, "code 7 not in enum", None, 1.7e9 + 0.25),
    ]
    body = orjson.loads(codec.telemetry(gateway_id="edge-01", boot_id="0" * 32, seq=5, asset_id="f-1",
                                        readings=readings))
    validate("telemetry", body)
    assert body["readings"] == [
        {"tag": "temp", "value": 36.7, "quality": "good", "source_ts": None, "ts": "2023-11-14T22:13:20.000Z"},
        {"tag": "status", "value": "running", "quality": "good", "source_ts": "2023-11-14T22:13:18.500Z",
         "ts": "2023-11-14T22:13:20.000Z"},
        {"tag": "flow", "value": None, "quality": "bad", "source_ts": None, "ts": "2023-11-14T22:13:20.250Z",
         "reason": "not a finite number (nan)"},
        {"tag": "code", "value": 7, "quality": "uncertain", "source_ts": None, "ts": "2023-11-14T22:13:20.250Z",
         "reason": "code 7 not in enum"},
    ]
