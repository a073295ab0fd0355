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


_GOOD = Quality.GOOD
_QUALITY = {q: q.value for q in Quality}


def telemetry(*, gateway_id: str, boot_id: str, seq: int, asset_id: str,
              readings: Iterable[Reading]) -> bytes:
    """Each reading: ``tag``, ``value``, ``quality``, ``source_ts``, ``ts``, and ``reason`` when not good.

    Hot path (one call per asset and commit, one item per value): the readings of one poll share
    their ``ts``, so the last conversion to ISO 8601 is reused, and so is the last ``source_ts``'s."""
    items: list[dict[str, object]] = []
    append = items.append
    last_ts: float | None = None
    last_iso = last_src_iso = ""
    last_src: float | None = None
    for r in readings:
        ts = r.ts
        if ts != last_ts:
            last_ts, last_iso = ts, iso_ms(ts)
        src = r.source_ts
        if src is None:
            src_iso = None
        else:
            if src != last_src:
                last_src, last_src_iso = src, iso_ms(src)
            src_iso = last_src_iso
        quality = r.quality
        if quality is _GOOD:
            append({"tag": r.tag, "value": r.value, "quality": "good", "source_ts": src_iso, "ts": last_iso})
        else:
            append({"tag": r.tag, "value": r.value, "quality": _QUALITY[quality], "source_ts": src_iso,
                    "ts": last_iso, "reason": r.reason})
    return orjson.dumps({
        "gateway_id": gateway_id,
        "boot_id": boot_id,
        "seq": seq,
        "asset_id": asset_id,
        "readings": items,
    })


def state(*, asset_id: str, asset_name: str, kind: str, ts: float,
          latest: Mapping[str, Reading]) -> bytes:
    values: dict[str, object] = {}
    quality: dict[str, str] = {}
    reasons: dict[str, str | None] = {}
    for tag, r in latest.items():
        values[tag] = r.value
        q = r.quality
        if q is _GOOD:
            quality[tag] = "good"
        else:
            quality[tag] = _QUALITY[q]
            reasons[tag] = r.reason
    return orjson.dumps({
        "asset_id": asset_id,
        "asset_name": asset_name,
        "kind": kind,
        "ts": iso_ms(ts),
        "values": values,
        "quality": quality,
        "reasons": reasons,
    })


def alert(*, gateway_id: str, seq: int, asset_name: str, kind: str, t: Transition,
          batch: Mapping[str, object] | None = None) -> bytes:
    """One alarm transition. Carries the production API's ``quality-alert`` fields (asset, parameter
    name, measured value, target value, deviation percentage, severity, code, timestamp); on an asset
    with a batch context also ``batch_id`` and ``recipe_id`` of the batch running then."""
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
        **(batch or {}),
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


def _event(name: str, *, gateway_id: str, seq: int, asset_id: str, asset_name: str, kind: str, tag: str,
           ts: float, **fields: object) -> bytes:
    return orjson.dumps({"event": name, "gateway_id": gateway_id, "seq": seq, "asset_id": asset_id,
                         "asset_name": asset_name, "kind": kind, "tag": tag, **fields, "ts": iso_ms(ts)})


def event(*, gateway_id: str, seq: int, asset_id: str, asset_name: str, kind: str, tag: str,
          old: object, new: object, ts: float, batch: Mapping[str, object] | None = None) -> bytes:
    """A status change, named like the production API's ``station-status`` / ``reactor-update``."""
    return _event("station-status" if kind == "station" else "reactor-update", gateway_id=gateway_id, seq=seq,
                  asset_id=asset_id, asset_name=asset_name, kind=kind, tag=tag, ts=ts, old_status=old, new_status=new,
                  **(batch or {}))


_TIMES = ("start", "end", "observed_from", "first_raised", "from", "to")


def _iso_times(value: object) -> object:
    """A batch document with every time field (epoch seconds) in ISO 8601, at any depth."""
    if isinstance(value, dict):
        return {k: (iso_ms(v) if k in _TIMES and isinstance(v, (int, float)) else _iso_times(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_iso_times(v) for v in value]
    return value


def shift(doc: Mapping[str, object], *, gateway_id: str, seq: int, asset_id: str, asset_name: str,
          ts: float) -> bytes:
    """A station's production summary of one shift (gateway/shifts.py), the KPI platform's entry."""
    return orjson.dumps({"event": "shift-summary", "gateway_id": gateway_id, "seq": seq, "asset_id": asset_id,
                         "asset_name": asset_name, **doc, "ts": iso_ms(ts)})


def batch(doc: Mapping[str, object], *, gateway_id: str, seq: int, asset_id: str, asset_name: str,
          kind: str) -> bytes:
    """A batch event (``batch-status-change``) or record (``batch-record``) of gateway/batches.py."""
    body = _iso_times({k: v for k, v in doc.items() if k not in ("event", "ts")})
    return orjson.dumps({"event": doc["event"], "gateway_id": gateway_id, "seq": seq, "asset_id": asset_id,
                         "asset_name": asset_name, "kind": kind, **body,  # type: ignore[dict-item]
                         "ts": iso_ms(doc["ts"])})  # type: ignore[arg-type]


def write_event(*, gateway_id: str, seq: int, asset_id: str, asset_name: str, kind: str, tag: str, user: str,
                comment: str | None, request_id: str | None, old: object, new: object, error: str | None,
                ts: float, batch: Mapping[str, object] | None = None) -> bytes:
    """The audit record of an operator's write to a PLC tag: who, what, old and new value, outcome."""
    return _event("tag-write", gateway_id=gateway_id, seq=seq, asset_id=asset_id, asset_name=asset_name, kind=kind,
                  tag=tag, ts=ts, user=user, comment=comment, request_id=request_id, old_value=old, new_value=new,
                  ok=error is None, error=error, **(batch or {}))


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
