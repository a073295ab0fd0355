"""The alarm engine on its own: table tests of every rule kind and the ISA-18.2 lifecycle, and
property tests (delays, hysteresis, determinism)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from gateway.model import Quality, Reading
from gateway.rules import AssetInfo, CommandError, Engine, Rule, State, Transition

T0 = 1_800_000_000.0


def engine(*rules: dict[str, Any], start: float = T0) -> Engine:
    info = AssetInfo(id="reactor-a", name="Reactor A", rules=tuple(Rule.model_validate(r) for r in rules),
                     devices={"temperature": "plc", "pressure": "plc", "ph_level": "plc", "ph_target": "plc",
                              "status": "plc", "density": "plc"},
                     units={"temperature": "degC", "pressure": "bar"})
    return Engine([info], start=start)


def r(tag: str, value: object, ts: float, quality: Quality = Quality.GOOD) -> Reading:
    return Reading("reactor-a", tag, value, quality, None if quality is Quality.GOOD else "sensor failure", None, ts)


def feed(e: Engine, tag: str, values: list[tuple[float, object]]) -> list[Transition]:
    out: list[Transition] = []
    for ts, v in values:
        out += e.update([r(tag, v, ts)], ts)
    return out


def states(ts: list[Transition]) -> list[str]:
    return [t.state.value for t in ts]


HIGH = {"tag": "temperature", "kind": "high", "limit": 85, "deadband": 1, "severity": "high", "code": "PROD009"}


# -- conditions ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("rule", "values", "expected"), [
    (HIGH, [85.0, 85.01], ["active_unacked"]),                   # above, not at, the limit
    (HIGH, [86, 84.5, 84.0, 83.9], ["active_unacked", "cleared_unacked"]),  # clears below limit - deadband
    ({"tag": "temperature", "kind": "low", "limit": 10, "deadband": 2}, [11, 9, 11.9, 12.1],
     ["active_unacked", "cleared_unacked"]),
    ({"tag": "temperature", "kind": "high-high", "limit": 95}, [94, 96], ["active_unacked"]),
    ({"tag": "temperature", "kind": "low_low", "limit": 0}, [1, -1, 0, 0.1], ["active_unacked", "cleared_unacked"]),
    ({"tag": "temperature", "kind": "target", "target": 70, "tolerance": 2}, [71, 72.1, 70.5],
     ["active_unacked", "cleared_unacked"]),
    ({"tag": "density", "kind": "target", "target": 1.02, "tolerance": "2%"}, [1.02, 1.0404, 1.0405, 1.03],
     ["active_unacked", "cleared_unacked"]),
])
def test_condition_table(rule: dict[str, Any], values: list[object], expected: list[str]) -> None:
    e = engine(rule)
    out = feed(e, rule["tag"], [(T0 + i, v) for i, v in enumerate(values)])
    assert states(out) == expected


def test_target_from_another_tag_and_deviation_percentage() -> None:
    e = engine({"tag": "ph_level", "kind": "target", "target_tag": "ph_target", "tolerance": 0.2, "code": "PH"})
    assert e.update([r("ph_level", 7.5, T0)], T0) == [], "no target known yet: nothing to compare"
    out = e.update([r("ph_target", 7.0, T0 + 1), r("ph_level", 7.35, T0 + 1)], T0 + 1)
    assert states(out) == ["active_unacked"]
    t = out[0]
    assert (t.value, t.target, t.limit, t.code) == (7.35, 7.0, None, "PH")
    assert t.deviation_percentage == pytest.approx(5.0)
    # the target moves with the recipe: the same value is now on target
    assert states(e.update([r("ph_target", 7.3, T0 + 2)], T0 + 2)) == ["cleared_unacked"]


def test_limit_deviation_and_message() -> None:
    e = engine(HIGH)
    t = feed(e, "temperature", [(T0, 93.5)])[0]
    assert (t.limit, t.target, t.severity, t.code, t.unit) == (85.0, None, "high", "PROD009", "degC")
    assert t.deviation_percentage == pytest.approx(10.0)
    assert t.message == "Reactor A: temperature 93.5 degC above 85 degC"


def test_a_cleared_alarm_says_so() -> None:
    e = engine(HIGH, {"tag": "pressure", "kind": "high", "limit": 3, "message": "{tag} critical: {value}",
                      "clear_message": "{tag} fine again: {value}{unit}"})
    out = feed(e, "temperature", [(T0, 90.0), (T0 + 1, 80.0)])
    assert [t.message for t in out] == ["Reactor A: temperature 90 degC above 85 degC",
                                        "Reactor A: temperature back to normal (80 degC)"]
    out = feed(e, "pressure", [(T0, 3.5), (T0 + 1, 2.0)])
    assert [t.message for t in out] == ["pressure critical: 3.5", "pressure fine again: 2 bar"]
    with pytest.raises(ValidationError, match="unknown placeholder"):
        Rule.model_validate({"tag": "t", "kind": "high", "limit": 1, "clear_message": "{oops}"})


def test_bad_values_keep_the_state_and_bad_quality_rule_fires() -> None:
    e = engine(HIGH, {"tag": "temperature", "kind": "bad_quality", "severity": "high"})
    assert states(feed(e, "temperature", [(T0, 90.0)])) == ["active_unacked"]
    out = e.update([r("temperature", None, T0 + 1, Quality.BAD)], T0 + 1)
    assert [(t.rule, t.state.value) for t in out] == [("bad_quality", "active_unacked")]
    assert "sensor failure" in out[0].message
    assert e.view("reactor-a/temperature_high")["state"] == "active_unacked", "a bad value clears nothing"
    out = e.update([r("temperature", 70.0, T0 + 2)], T0 + 2)
    assert sorted((t.rule, t.state.value) for t in out) == [("bad_quality", "cleared_unacked"),
                                                           ("high", "cleared_unacked")]


def test_rate_of_change_over_its_window() -> None:
    e = engine({"tag": "temperature", "kind": "rate", "limit": 5, "window": "60s", "direction": "rising"})
    # +1 degC every 20 s = 3 degC/min: fine; then +4 degC in 20 s pushes the window average over 5/min
    out = feed(e, "temperature", [(T0 + 20 * i, 20.0 + i) for i in range(4)])
    assert out == []
    out = feed(e, "temperature", [(T0 + 80, 27.0)])
    assert states(out) == ["active_unacked"]
    assert out[0].message.startswith("Reactor A: temperature changing 6 degC/min")
    falling = engine({"tag": "temperature", "kind": "rate", "limit": 5, "direction": "rising"})
    assert feed(falling, "temperature", [(T0, 50.0), (T0 + 10, 40.0)]) == [], "falling is not rising"


def test_stale_value_fires_on_tick_and_clears_with_a_good_reading() -> None:
    e = engine({"tag": "temperature", "kind": "stale", "after": "30s", "severity": "low"})
    assert e.next_deadline() == T0 + 30, "a tag never read is stale `after` seconds after start"
    e.update([r("temperature", 20.0, T0 + 10)], T0 + 10)
    assert e.next_deadline() == T0 + 40
    assert e.tick(T0 + 39.9) == []
    e.update([r("temperature", None, T0 + 35, Quality.BAD)], T0 + 35)  # a bad reading is no sign of life
    assert states(e.tick(T0 + 40.1)) == ["active_unacked"]
    assert states(e.update([r("temperature", 20.0, T0 + 41)], T0 + 41)) == ["cleared_unacked"]


def test_a_device_that_answers_keeps_its_unchanged_values_fresh() -> None:
    """Subscriptions report changes only: an answer without news still vouches for good values."""
    e = engine({"tag": "temperature", "kind": "stale", "after": "30s"})
    e.update([r("temperature", 20.0, T0)], T0)
    assert e.device("plc", True, T0 + 25) == []
    assert e.tick(T0 + 50) == [], "confirmed at +25 s: fresh until +55 s"
    assert states(e.tick(T0 + 55.1)) == ["active_unacked"]
    e.update([r("temperature", None, T0 + 56, Quality.BAD)], T0 + 56)
    e.device("plc", True, T0 + 57)
    assert e.view("reactor-a/temperature_stale")["active"] is True, "a bad value is not vouched for"


def test_a_stale_rule_outside_its_states_sets_no_deadline_in_the_past() -> None:
    """Otherwise the pipeline, which sleeps until the next deadline, would spin."""
    e = engine({"tag": "temperature", "kind": "stale", "after": "30s", "when": {"status": ["heating"]}})
    e.update([r("status", "idle", T0 + 1)], T0 + 1)
    assert e.tick(T0 + 31) == [], "not heating: not stale"
    deadline = e.next_deadline()
    assert deadline is None or deadline > T0 + 31


def test_comm_lost_follows_the_device_of_the_tag() -> None:
    e = engine({"tag": "pressure", "kind": "comm_lost", "delay": "10s", "severity": "high"})
    assert e.device("plc", False, T0) == []
    assert e.next_deadline() == T0 + 10
    out = e.tick(T0 + 10)
    assert states(out) == ["active_unacked"]
    assert out[0].message == "Reactor A: communication with plc lost"
    assert e.device("other-plc", True, T0 + 11) == []
    assert states(e.device("plc", True, T0 + 12)) == ["cleared_unacked"]


def test_when_limits_a_rule_to_given_states() -> None:
    e = engine({**HIGH, "when": {"status": ["heating", "mixing"]}})
    assert feed(e, "temperature", [(T0, 90.0)]) == [], "status unknown: the rule does not apply"
    assert states(e.update([r("status", "heating", T0 + 1)], T0 + 1)) == ["active_unacked"]
    assert states(e.update([r("status", "cleaning", T0 + 2)], T0 + 2)) == ["cleared_unacked"]


# -- delays --------------------------------------------------------------------------------------

def test_on_delay_needs_the_condition_throughout() -> None:
    e = engine({**HIGH, "delay": "5s", "off_delay": "3s"})
    assert feed(e, "temperature", [(T0, 90.0), (T0 + 3, 90.0), (T0 + 4, 80.0), (T0 + 6, 90.0)]) == []
    assert e.next_deadline() == T0 + 11
    assert e.tick(T0 + 10.9) == []
    assert states(e.tick(T0 + 11)) == ["active_unacked"]
    assert feed(e, "temperature", [(T0 + 12, 80.0)]) == []
    assert states(e.tick(T0 + 15)) == ["cleared_unacked"]


# -- lifecycle -----------------------------------------------------------------------------------

def test_isa_lifecycle_acknowledge() -> None:
    e = engine(HIGH)
    aid = "reactor-a/temperature_high"
    assert e.acknowledge(aid, T0) is None, "nothing to acknowledge in normal"
    feed(e, "temperature", [(T0, 90.0)])
    t = e.acknowledge(aid, T0 + 1, user="op1", comment="seen")
    assert t is not None
    assert (t.previous, t.state, t.trigger, t.user, t.comment) == (
        State.ACTIVE_UNACKED, State.ACTIVE_ACKED, "acknowledge", "op1", "seen")
    assert e.acknowledge(aid, T0 + 2) is None, "a repeated ack changes nothing"
    assert states(feed(e, "temperature", [(T0 + 3, 80.0)])) == ["normal"], "acked and cleared: normal"
    feed(e, "temperature", [(T0 + 4, 90.0), (T0 + 5, 80.0)])
    assert e.view(aid)["state"] == "cleared_unacked"
    assert e.not_normal("reactor-a")[0]["alarm_id"] == aid
    assert states(feed(e, "temperature", [(T0 + 6, 90.0)])) == ["active_unacked"], "returns while unacked"
    feed(e, "temperature", [(T0 + 7, 80.0)])
    t = e.acknowledge(aid, T0 + 8)
    assert t is not None and t.state is State.NORMAL
    assert e.not_normal("reactor-a") == []
    with pytest.raises(CommandError, match="no alarm"):
        e.acknowledge("reactor-a/nope", T0)


def test_shelve_hides_until_expiry_then_annunciates_again() -> None:
    e = engine(HIGH)
    aid = "reactor-a/temperature_high"
    feed(e, "temperature", [(T0, 90.0)])
    t = e.shelve(aid, T0 + 1, 60.0, user="op1")
    assert (t.state, t.shelved_until) == (State.SHELVED, T0 + 61)
    assert feed(e, "temperature", [(T0 + 2, 80.0), (T0 + 3, 95.0)]) == [], "shelved: tracked, not annunciated"
    assert e.next_deadline() == T0 + 61
    out = e.tick(T0 + 61)
    assert [(x.state, x.trigger) for x in out] == [(State.ACTIVE_UNACKED, "shelve_expired")]
    with pytest.raises(CommandError, match="duration"):
        e.shelve(aid, T0, 0)
    with pytest.raises(CommandError, match="duration"):
        e.shelve(aid, T0, 25 * 3600)


def test_unshelve_and_out_of_service() -> None:
    e = engine(HIGH)
    aid = "reactor-a/temperature_high"
    e.shelve(aid, T0, 600)
    t = e.unshelve(aid, T0 + 1)
    assert t is not None and t.state is State.NORMAL
    assert e.unshelve(aid, T0 + 2) is None
    t = e.out_of_service(aid, T0 + 3)
    assert t is not None and t.state is State.OUT_OF_SERVICE
    with pytest.raises(CommandError, match="out of service"):
        e.shelve(aid, T0 + 4, 60)
    feed(e, "temperature", [(T0 + 5, 90.0)])
    t = e.in_service(aid, T0 + 6)
    assert t is not None and (t.state, t.trigger) == (State.ACTIVE_UNACKED, "in_service")


def test_snapshot_restore_round_trip() -> None:
    e = engine(HIGH)
    aid = "reactor-a/temperature_high"
    feed(e, "temperature", [(T0, 90.0)])
    e.acknowledge(aid, T0 + 1)
    saved = e.snapshot(aid)
    again = engine(HIGH)
    assert again.restore(aid, saved)
    assert again.view(aid) == e.view(aid)
    assert states(feed(again, "temperature", [(T0 + 2, 80.0)])) == ["normal"]
    assert not again.restore("reactor-a/gone", saved)
    assert not again.restore(aid, {"state": "weird", "active": True})
    assert not again.restore(aid, {"active": True})


# -- rule declarations ---------------------------------------------------------------------------

@pytest.mark.parametrize(("rule", "message"), [
    ({"tag": "t", "kind": "high"}, "needs limit"),
    ({"tag": "t", "kind": "target", "tolerance": 1}, "target (a number) or target_tag"),
    ({"tag": "t", "kind": "target", "target": 1, "target_tag": "x", "tolerance": 1}, "not both"),
    ({"tag": "t", "kind": "high", "limit": 1, "tolerance": 1}, "tolerance does not apply"),
    ({"tag": "t", "kind": "stale"}, "needs after"),
    ({"tag": "t", "kind": "stale", "after": "10s", "deadband": 1}, "deadband does not apply"),
    ({"tag": "t", "kind": "rate", "limit": -1}, "positive"),
    ({"tag": "t", "kind": "high", "limit": 1, "direction": "rising"}, "direction applies"),
    ({"tag": "t", "kind": "target", "target": 7, "tolerance": 0.2, "deadband": 0.2}, "below the tolerance"),
    ({"tag": "t", "kind": "high", "limit": 1, "message": "{tag} {nope}"}, "unknown placeholder"),
    ({"tag": "t", "kind": "sideways", "limit": 1}, "Input should be"),
    ({"tag": "t", "kind": "high", "limit": 1, "severity": "urgent"}, "Input should be"),
])
def test_bad_rules_are_refused(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        Rule.model_validate(rule)


# -- properties ----------------------------------------------------------------------------------

steps = st.lists(st.tuples(st.floats(0.05, 4.0), st.floats(70.0, 100.0)), min_size=1, max_size=80)


def run(rule: dict[str, Any], seq: list[tuple[float, float]], ticks: bool = True) -> list[Transition]:
    e = engine(rule)
    out: list[Transition] = []
    ts = T0
    for dt, v in seq:
        if ticks:
            deadline = e.next_deadline()
            if deadline is not None and deadline < ts + dt:
                out += e.tick(deadline)
        ts += dt
        out += e.update([r("temperature", v, ts)], ts)
    return out


def in_effect(readings: list[tuple[float, float]], start: float, end: float) -> list[float]:
    """Values that held at some time in [start, end]: the one read last before start, and every later one."""
    before = [v for ts, v in readings if ts <= start]
    return before[-1:] + [v for ts, v in readings if start < ts <= end]


@settings(max_examples=300, deadline=None)
@given(steps, st.floats(0, 5), st.floats(0, 5), st.floats(0, 3))
def test_an_alarm_never_toggles_faster_than_its_delays(seq: list[tuple[float, float]], delay: float,
                                                       off_delay: float, deadband: float) -> None:
    """A raise at t needs the value above the limit throughout [t - delay, t]; a clear at t needs it
    back inside the limit by the deadband throughout [t - off_delay, t]."""
    out = run({**HIGH, "delay": delay, "off_delay": off_delay, "deadband": deadband}, seq)
    readings, ts = [], T0
    for dt, v in seq:
        ts += dt
        readings.append((ts, v))
    for t in out:
        start = t.ts - (delay if t.active else off_delay) + 1e-9
        held = in_effect(readings, start, t.ts)
        assert held, f"{'raised' if t.active else 'cleared'} at {t.ts - T0} before its delay could run out"
        if t.active:
            assert all(v > 85 for v in held), f"raised at {t.ts - T0} though values {held} were not all above"
        else:
            assert all(v <= 85 - deadband for v in held), f"cleared at {t.ts - T0} though {held} were not all below"
    changes = [t.active for t in out]
    assert all(a != b for a, b in zip(changes, changes[1:], strict=False)), "raise and clear alternate"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.05, 4.0), st.floats(84.0 + 1e-6, 90.0)), min_size=1, max_size=80))
def test_inside_the_deadband_at_most_one_alarm(seq: list[tuple[float, float]]) -> None:
    """Limit 85, deadband 1: anything above 84 never clears once raised, so it raises at most once."""
    out = run(HIGH, seq)
    assert len([t for t in out if t.state is State.ACTIVE_UNACKED]) <= 1
    assert all(t.active for t in out)


@settings(max_examples=100, deadline=None)
@given(steps, st.floats(0, 5), st.floats(0, 5))
def test_same_readings_same_transitions(seq: list[tuple[float, float]], delay: float, off_delay: float) -> None:
    rule = {**HIGH, "delay": delay, "off_delay": off_delay}
    assert run(rule, seq) == run(rule, seq)


@settings(max_examples=100, deadline=None)
@given(steps, st.lists(st.sampled_from(["ack", "shelve", "unshelve", "oos", "ins", "tick"]), max_size=20))
def test_lifecycle_states_are_always_consistent(seq: list[tuple[float, float]], ops: list[str]) -> None:
    """Whatever operators do, active_* states go with an active condition and cleared/normal without."""
    e = engine(HIGH)
    aid = "reactor-a/temperature_high"
    ts = T0
    for i, (dt, v) in enumerate(seq):
        ts += dt
        e.update([r("temperature", v, ts)], ts)
        if i < len(ops):
            op = ops[i]
            try:
                {"ack": lambda: e.acknowledge(aid, ts), "shelve": lambda: e.shelve(aid, ts, 5.0),
                 "unshelve": lambda: e.unshelve(aid, ts), "oos": lambda: e.out_of_service(aid, ts),
                 "ins": lambda: e.in_service(aid, ts), "tick": lambda: e.tick(ts)}[op]()
            except CommandError:
                pass
        view = e.view(aid)
        if view["state"] in ("active_unacked", "active_acked"):
            assert view["active"] is True
        if view["state"] in ("cleared_unacked", "normal"):
            assert view["active"] is False
