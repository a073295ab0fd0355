"""Pure payload codec for the MQTT contract (DESIGN.md): bytes out, no I/O, no clock."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson

from .model import Quality, Reading, iso_ms
from .rules import Transition


@dataclass(frozen=True, slots=True)
class Topics:
    prefix: str
    gateway_id: str

    @property
    def status(self) -> str:
        return f"{self.prefix}/gateways/{self.gateway_id}/status"

    def command(self, name: str) -> str:
        return f"{self.prefix}/gateways/{self.gateway_id}/cmd/{name}"

    def asset(self, kind: str, asset_id: str, leaf: str) -> str:
        return f"{self.prefix}/{kind}s/{asset_id}/{leaf}"


def _reading(r: Reading) -> dict[str, object]:
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


def telemetry(*, gateway_id: str, boot_id: str, seq: int, asset_id: str,
              readings: Iterable[Reading]) -> bytes:
    return orjson.dumps({
        "gateway_id": gateway_id,
        "boot_id": boot_id,
        "seq": seq,
        "asset_id": asset_id,
        "readings": [_reading(r) for r in readings],
    })


def state(*, asset_id: str, asset_name: str, kind: str, ts: float,
          latest: Mapping[str, Reading]) -> bytes:
    return orjson.dumps({
        "asset_id": asset_id,
        "asset_name": asset_name,
        "kind": kind,
        "ts": iso_ms(ts),
        "values": {tag: r.value for tag, r in latest.items()},
        "quality": {tag: r.quality.value for tag, r in latest.items()},
        "reasons": {tag: r.reason for tag, r in latest.items() if r.quality is not Quality.GOOD},
    })


def alert(*, gateway_id: str, seq: int, asset_name: str, kind: str, t: Transition) -> bytes:
    """One alarm transition. Carries the production API's ``quality-alert`` fields (asset, parameter
    name, measured value, target value, deviation percentage, severity, code, timestamp)."""
    return orjson.dumps({
        "event": "quality-alert",
        "gateway_id": gateway_id,
        "seq": seq,
        "alarm_id": t.alarm_id,
        "asset_id": t.asset_id,
        "asset_name": asset_name,
        "kind": kind,
        "tag": t.tag,
        "rule": t.rule,
        "rule_id": t.rule_id,
        "code": t.code,
        "state": t.state.value,
        "previous_state": t.previous.value,
        "active": t.active,
        "trigger": t.trigger,
        "severity": t.severity,
        "value": t.value,
        "unit": t.unit,
        "limit": t.limit,
        "target": t.target,
        "deviation_percentage": t.deviation_percentage,
        "message": t.message,
        "user": t.user,
        "comment": t.comment,
        "shelved_until": iso_ms(t.shelved_until) if t.shelved_until is not None else None,
        "ts": iso_ms(t.ts),
    })


def alarm_view(view: Mapping[str, object]) -> dict[str, object]:
    """One alarm as the contract shows it (``alarms`` items, command replies): times in ISO 8601."""
    item = dict(view)
    for key in ("since", "shelved_until"):
        v = item.get(key)
        item[key] = iso_ms(v) if isinstance(v, (int, float)) else None
    return item


def alarms(items: Iterable[Mapping[str, object]]) -> bytes:
    """The retained list of an asset's alarms that are not normal (``[]`` when all are normal)."""
    return orjson.dumps([alarm_view(a) for a in items])


def event(*, gateway_id: str, seq: int, asset_id: str, asset_name: str, kind: str, tag: str,
          old: object, new: object, ts: float) -> bytes:
    """A status change, named like the production API's ``station-status`` / ``reactor-update``."""
    return orjson.dumps({
        "event": "station-status" if kind == "station" else "reactor-update",
        "gateway_id": gateway_id,
        "seq": seq,
        "asset_id": asset_id,
        "asset_name": asset_name,
        "kind": kind,
        "tag": tag,
        "old_status": old,
        "new_status": new,
        "ts": iso_ms(ts),
    })


def status(*, online: bool, gateway_id: str, version: str, boot_id: str, ts: float) -> bytes:
    return orjson.dumps({
        "state": "online" if online else "offline",
        "gateway_id": gateway_id,
        "version": version,
        "boot_id": boot_id,
        "ts": iso_ms(ts),
    })


def decode(payload: bytes) -> object:
    return orjson.loads(payload)
