"""The alarm engine's indexes (tag -> alarms, device -> tag states, alarms with a timer, counts) and its
fast path for limit rules, against the full scans and the general branch they replace: the same
transitions, deadlines, counts and alarm views for any inputs."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.model import Quality, Reading
from gateway.rules import SEVERITIES, AssetInfo, CommandError, Engine, Rule, State, Transition, _number, _remember
from gateway.rules import _TagState as TagState

T0 = 1_800_000_000.0
RULES: list[dict[str, Any]] = [
    {"tag": "temperature", "kind": "high", "limit": 85, "deadband": 1, "delay": 2, "severity": "high"},
    {"tag": "temperature", "kind": "low", "limit": 5, "deadband": 1, "off_delay": 3, "severity": "medium"},
    {"tag": "temperature", "kind": "stale", "after": 20, "severity": "low"},
    {"tag": "pressure", "kind": "rate", "limit": 10, "window": 30, "severity": "critical"},
    {"tag": "pressure", "kind": "bad_quality", "delay": 1, "severity": "high"},
    {"tag": "status", "kind": "comm_lost", "delay": 3, "severity": "high"},
    {"tag": "ph_level", "kind": "target", "target_tag": "ph_target", "tolerance": 0.2, "delay": 1,
     "when": {"status": ["running"]}},
    {"tag": "efficiency", "kind": "low", "limit": 60, "deadband": 5, "severity": "low"},  # a derived value
]
DEVICES = {"r1": {"temperature": "plc-a", "pressure": "plc-a", "status": "plc-b", "ph_level": "plc-b",
                  "ph_target": "plc-b"},
           "r2": {"temperature": "plc-b", "pressure": "plc-b", "status": "plc-b", "ph_level": "plc-b",
                  "ph_target": "plc-b"}}
TAGS = ["temperature", "pressure", "status", "ph_level", "ph_target", "efficiency"]


def build() -> Engine:
    rules = tuple(Rule.model_validate(r) for r in RULES)
    return Engine([AssetInfo(id=a, name=a.upper(), rules=rules, devices=d, units={"temperature": "degC"})
                   for a, d in DEVICES.items()], start=T0)


# -- the full scans, as the engine had them ----------------------------------------------------------

def ref_update(e: Engine, readings: list[Reading], now: float) -> list[Transition]:
    touched: set[int] = set()
    for r in readings:
        key = (r.asset, r.tag)
        s = e.tags.get(key)
        if s is None:
            s = e.tags[key] = TagState()
        s.value, s.quality, s.reason = r.value, r.quality, r.reason
        if r.quality is Quality.GOOD:
            s.good_ts = r.ts
        for i in e._readers.get(key, ()):
            touched.add(i)
            alarm = e._order[i]
            if alarm.rule.kind == "rate" and alarm.rule.tag == r.tag and r.quality is Quality.GOOD \
                    and _number(r.value) is not None:
                _remember(alarm, r.ts, float(r.value))  # type: ignore[arg-type]
    out: list[Transition] = []
    for i in sorted(touched):
        e._evaluate(e._order[i], now, out)
    return out


def ref_device(e: Engine, device_id: str, connected: bool, now: float) -> list[Transition]:
    if connected:
        for asset_id, tag in e._tags_of.get(device_id, ()):
            s = e.tags.get((asset_id, tag))
            if s is not None and s.quality is Quality.GOOD:
                s.good_ts = now
    if connected == (device_id not in e.devices_down):
        return []
    if connected:
        e.devices_down.discard(device_id)
    else:
        e.devices_down.add(device_id)
    out: list[Transition] = []
    for alarm in e.alarms.values():
        if alarm.rule.kind == "comm_lost" and alarm.asset.devices.get(alarm.rule.tag) == device_id:
            e._evaluate(alarm, now, out)
    return out


def ref_tick(e: Engine, now: float) -> list[Transition]:
    out: list[Transition] = []
    for alarm in e.alarms.values():
        if alarm.state is State.SHELVED and alarm.shelved_until is not None and now >= alarm.shelved_until:
            e._return(alarm, now, "shelve_expired", None, None, out)
        if alarm.pending_since is not None or alarm.rule.kind == "stale":
            e._evaluate(alarm, now, out)
    return out


def ref_next_deadline(e: Engine) -> float | None:
    times: list[float] = []
    for a in e.alarms.values():
        r = a.rule
        if a.pending_since is not None:
            times.append(a.pending_since + (r.off_delay if a.active else r.delay))
        if a.state is State.SHELVED and a.shelved_until is not None:
            times.append(a.shelved_until)
        if r.kind == "stale" and r.after is not None and not a.raw:
            s = e.tags.get((a.asset.id, r.tag))
            last = s.good_ts if s and s.good_ts is not None else e.start
            due = max(last, e.start) + r.after
            if due > e.evaluated:
                times.append(due)
    return min(times) if times else None


def ref_counts(e: Engine) -> dict[str, int]:
    out: dict[str, int] = dict.fromkeys(SEVERITIES, 0)
    for a in e.alarms.values():
        if a.state is not State.NORMAL:
            out[a.rule.severity] += 1
    return out


# -- random inputs -------------------------------------------------------------------------------------

def _value(tag: str) -> st.SearchStrategy[object]:
    return {
        "temperature": st.sampled_from([0.0, 4.0, 5, 5.0, 6.0, 50.0, 84.0, 84.5, 85, 85.0, 85.5, 99.0, True,
                                        float("nan"), float("inf"), "hot"]) | st.floats(-10, 110),
        "pressure": st.floats(0, 5) | st.just("n/a"),
        "status": st.sampled_from(["running", "idle"]),
        "ph_level": st.floats(6.0, 8.0),
        "ph_target": st.sampled_from([7.0, 7.1]),
        "efficiency": st.floats(0, 100) | st.none(),
    }[tag]


@st.composite
def _reading(draw: st.DrawFn, ts: float) -> Reading:
    tag = draw(st.sampled_from(TAGS))
    quality = draw(st.sampled_from([Quality.GOOD, Quality.GOOD, Quality.GOOD, Quality.BAD, Quality.UNCERTAIN]))
    value = draw(_value(tag)) if quality is not Quality.BAD else None
    return Reading(draw(st.sampled_from(list(DEVICES))), tag, value, quality,
                   None if quality is Quality.GOOD else "timeout", None, ts)


ALARM_IDS = [f"{a}/{Rule.model_validate(r).rule_id}" for a in DEVICES for r in RULES]


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_indexed_engine_equals_full_scans(data: st.DataObject) -> None:
    fast, ref = build(), build()
    for alarm in ref._order:
        alarm.side = 0  # limit rules through the general branch of _condition, not its fast path
    now = T0
    for _ in range(data.draw(st.integers(1, 60), label="steps")):
        now += data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.5, 4.0, 25.0]), label="dt")
        op = data.draw(st.sampled_from(["update", "update", "update", "device", "tick", "command", "restore"]))
        if op == "update":
            readings = data.draw(st.lists(_reading(now), max_size=8), label="readings")
            assert fast.update(readings, now) == ref_update(ref, readings, now)
        elif op == "device":
            device = data.draw(st.sampled_from(["plc-a", "plc-b"]))
            up = data.draw(st.booleans())
            assert fast.device(device, up, now) == ref_device(ref, device, up, now)
        elif op == "tick":
            assert fast.tick(now) == ref_tick(ref, now)
        elif op == "command":
            name = data.draw(st.sampled_from(["acknowledge", "shelve", "unshelve", "out_of_service", "in_service"]))
            alarm_id = data.draw(st.sampled_from(ALARM_IDS))
            duration = data.draw(st.sampled_from([1.0, 30.0]))
            results: list[object] = []
            for e in (fast, ref):
                try:
                    if name == "shelve":
                        results.append(e.shelve(alarm_id, now, duration))
                    else:
                        results.append(getattr(e, name)(alarm_id, now))
                except CommandError as exc:
                    results.append(str(exc))
            assert results[0] == results[1]
        else:  # restore: an alarm takes the saved state of another one (states, shelving, counts move)
            alarm_id, source = data.draw(st.sampled_from(ALARM_IDS)), data.draw(st.sampled_from(ALARM_IDS))
            saved = ref.snapshot(source)
            assert fast.restore(alarm_id, saved) == ref.restore(alarm_id, saved)
        assert fast.counts() == ref_counts(ref) == ref_counts(fast)
        assert fast.next_deadline() == ref_next_deadline(ref)
        if data.draw(st.booleans(), label="compare views"):  # reading a deviation computes it: not always
            assert [fast.view(a) for a in ALARM_IDS] == [ref.view(a) for a in ALARM_IDS]
    assert [fast.view(a) for a in ALARM_IDS] == [ref.view(a) for a in ALARM_IDS]
    assert [fast.snapshot(a) for a in ALARM_IDS] == [ref.snapshot(a) for a in ALARM_IDS]
