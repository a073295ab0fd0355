"""Operator commands, pure: the decoder and the gateway's policy (what may be written, by whom).

Hypothesis throws malformed JSON, wrong types, unknown assets and tags and out-of-range values at
them: each is refused with a reason, and only a value the tag map allows ever gets through.
"""

from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway import commands as cmds
from gateway.tagmap import TagMap, load_tag_map_text

from .helpers import validate

MAP = """
gateway: {id: edge-01}
mqtt: {topic_prefix: ninu/plant-1}
commands: {alarms: true, writes: true, users: [op1, op2]}
devices:
  - {id: plc-1, protocol: modbus_tcp, host: 127.0.0.1}
  - {id: plc-2, protocol: opcua, endpoint: "opc.tcp://127.0.0.1:4840"}
assets:
  - id: filler-1
    kind: station
    device: plc-1
    tags:
      speed_setpoint: {table: holding, address: 40, type: float32, writable: true, min: 0, max: 120}
      batch_size: {table: holding, address: 42, type: uint16, writable: true, min: 1, max: 5000}
      fill_ml: {table: holding, address: 43, type: int16, scale: 0.1, writable: true, min: -10, max: 1000}
      mode: {table: holding, address: 44, enum: {0: auto, 1: manual}, writable: true}
      enabled: {table: coil, address: 0, type: bool, writable: true}
      recipe: {table: holding, address: 50, type: string, count: 4, writable: true}
      units_total: {table: input, address: 0, type: uint32}
  - id: reactor-a
    kind: reactor
    device: plc-2
    tags:
      temperature_sp: {node: "ns=2;s=A.TSP", type: float, writable: true, min: 5, max: 95}
      stirrer_rpm: {node: "ns=2;s=A.RPM", type: int, writable: true, min: 0, max: 300}
      temperature: {node: "ns=2;s=A.T", type: float}
"""


@pytest.fixture(scope="module")
def tm() -> TagMap:
    return load_tag_map_text(MAP, "commands.yaml")


def write(asset: str, tag: str, value: object, user: str = "op1") -> cmds.Write:
    w = cmds.parse("write", orjson.dumps({"asset": asset, "tag": tag, "value": value, "user": user}))
    assert isinstance(w, cmds.Write)
    return w


@pytest.mark.parametrize(("asset", "tag", "value"), [
    ("filler-1", "speed_setpoint", 99.5),
    ("filler-1", "speed_setpoint", 0),
    ("filler-1", "batch_size", 5000),
    ("filler-1", "fill_ml", 12.3),
    ("filler-1", "mode", "manual"),
    ("filler-1", "enabled", False),
    ("filler-1", "recipe", "R-12"),
    ("reactor-a", "temperature_sp", 60),
    ("reactor-a", "stirrer_rpm", 120),
])
def test_writes_the_map_allows(tm: TagMap, asset: str, tag: str, value: object) -> None:
    assert cmds.refuse(tm, write(asset, tag, value)) is None


@pytest.mark.parametrize(("asset", "tag", "value", "user", "error"), [
    ("filler-9", "speed_setpoint", 1.0, "op1", "unknown asset 'filler-9'"),
    ("filler-1", "speed", 1.0, "op1", "asset 'filler-1' has no tag 'speed'"),
    ("filler-1", "units_total", 1, "op1", "filler-1/units_total is not writable"),
    ("reactor-a", "temperature", 50.0, "op1", "reactor-a/temperature is not writable"),
    ("filler-1", "speed_setpoint", 120.5, "op1", "above the tag's max 120"),
    ("filler-1", "speed_setpoint", -0.1, "op1", "below the tag's min 0"),
    ("filler-1", "speed_setpoint", "fast", "op1", "value must be a number"),
    ("filler-1", "speed_setpoint", True, "op1", "value must be a number"),
    ("filler-1", "batch_size", 2.5, "op1", "value must be a whole number"),
    ("filler-1", "mode", "turbo", "op1", "value must be one of ['auto', 'manual']"),
    ("filler-1", "mode", 1, "op1", "value must be one of"),
    ("filler-1", "enabled", 1, "op1", "value must be true or false"),
    ("filler-1", "recipe", 12, "op1", "value must be a string"),
    ("filler-1", "speed_setpoint", 10.0, "intruder", "user 'intruder' may not send commands"),
])
def test_writes_the_map_refuses(tm: TagMap, asset: str, tag: str, value: object, user: str, error: str) -> None:
    why = cmds.refuse(tm, write(asset, tag, value, user))
    assert why is not None and error in why


def test_commands_are_off_unless_the_map_turns_them_on(tm: TagMap) -> None:
    off = tm.model_copy(update={"commands": type(tm.commands)()})
    assert (off.commands.alarms, off.commands.writes, off.commands.users) == (False, False, None)
    assert "writes are disabled" in (cmds.refuse(off, write("filler-1", "speed_setpoint", 1.0)) or "")
    ack = cmds.parse("acknowledge", b'{"alarm_id": "filler-1/x", "user": "op1"}')
    assert "alarm commands are disabled" in (cmds.refuse(off, ack) or "")
    alarms_only = tm.model_copy(update={"commands": tm.commands.model_copy(update={"writes": False})})
    assert cmds.refuse(alarms_only, ack) is None
    assert "writes are disabled" in (cmds.refuse(alarms_only, write("filler-1", "speed_setpoint", 1.0)) or "")


@pytest.mark.parametrize(("payload", "error"), [
    (b'{"asset": "filler-1", "tag": "mode", "value": "auto"}', "user: Field required"),
    (b'{"asset": "filler-1", "tag": "mode", "value": null, "user": "op1"}', "value"),
    (b'{"asset": "filler-1", "tag": "mode", "value": [1], "user": "op1"}', "value"),
    (b'{"asset": "filler-1", "tag": "mode", "value": {"a": 1}, "user": "op1"}', "value"),
    (b'{"asset": "Filler 1", "tag": "mode", "value": "auto", "user": "op1"}', "asset"),
    (b'{"asset": "filler-1", "tag": "../etc", "value": "auto", "user": "op1"}', "tag"),
    (b'{"asset": "filler-1", "tag": "mode", "value": "auto", "user": ""}', "user"),
    (b'{"asset": "filler-1", "tag": "mode", "value": "auto", "user": "op1", "force": true}', "force"),
    (b'{"asset": "filler-1", "tag": "mode", "value": NaN, "user": "op1"}', "not JSON"),
])
def test_malformed_writes_are_rejected(payload: bytes, error: str) -> None:
    with pytest.raises(cmds.Rejected, match=error):
        cmds.parse("write", payload)


VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))
ASSETS = st.sampled_from(["filler-1", "reactor-a", "filler-9", "", "FILLER-1", 3])
TAGS = st.sampled_from(["speed_setpoint", "batch_size", "fill_ml", "mode", "enabled", "recipe", "units_total",
                        "temperature_sp", "stirrer_rpm", "temperature", "nope", "", None])


@settings(max_examples=600, deadline=None)
@given(st.fixed_dictionaries({}, optional={"asset": ASSETS, "tag": TAGS, "value": VALUES,
                                           "user": st.sampled_from(["op1", "op2", "x", "", 5]),
                                           "request_id": st.one_of(st.text(max_size=5), st.integers()),
                                           "comment": st.text(max_size=5), "junk": st.integers()}))
@example({"asset": "filler-1", "tag": "speed_setpoint", "value": 1e308 * 10, "user": "op1"})
@example({"asset": "filler-1", "tag": "batch_size", "value": 2**64, "user": "op1"})
def test_any_write_is_refused_with_a_reason_or_fits_the_tag(tm: TagMap, body: dict[str, object]) -> None:
    """Whatever arrives: a reply that says why, or a value of the tag's type within its range."""
    payload = json.dumps(body).encode()  # NaN and Infinity as Python writes them: not JSON, to be refused
    try:
        w = cmds.parse("write", payload)
    except cmds.Rejected as exc:
        assert str(exc)
        validate("reply", orjson.loads(cmds.reply(gateway_id="g", command="write", request_id=exc.request_id,
                                                  ts=0.0, error=str(exc))))
        return
    assert isinstance(w, cmds.Write)
    why = cmds.refuse(tm, w)
    if why is not None:
        assert why
        return
    tag = tm.asset(w.asset).tags[w.tag]
    assert tag.writable and w.user in ("op1", "op2")
    kind = cmds.tag_kind(tag)
    if kind == "enum":
        assert w.value in (tag.enum or {}).values()
    elif kind == "bool":
        assert isinstance(w.value, bool)
    elif kind == "string":
        assert isinstance(w.value, str)
    else:
        assert isinstance(w.value, (int, float)) and not isinstance(w.value, bool) and math.isfinite(w.value)
        assert tag.min is not None and tag.max is not None and tag.min <= w.value <= tag.max
