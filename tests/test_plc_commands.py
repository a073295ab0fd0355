"""Operator writes end to end: MQTT command -> policy -> the station PLC -> audit event -> reply.

Real Mosquitto, real station simulators. A few hundred malformed or forbidden writes are answered
with a reason each and never reach the PLC (its write counter and registers stay as they were).
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import aiomqtt
import orjson
import pytest

from gateway.app import Gateway
from gateway.brokers import Mosquitto
from gateway.tagmap import CommandsConfig, TagMap
from simulators.stations import Station

from .helpers import Collector, collecting, running, total, validate, wait_until

pytestmark = pytest.mark.integration
PREFIX = "ninu/plant-1"


def with_commands(tm: TagMap, **policy: object) -> TagMap:
    return tm.model_copy(update={"commands": CommandsConfig.model_validate(policy)})


async def publish_all(port: int, name: str, payloads: list[bytes]) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"central-{time.monotonic_ns()}") as client:
        for payload in payloads:
            await client.publish(f"{PREFIX}/gateways/edge-01/cmd/{name}", payload, qos=1)


async def listening(port: int, sub: Collector) -> None:
    """Wait until the gateway answers commands (its subscription is in place): a command sent
    before that is not queued for it (clean session)."""
    for i in range(100):
        await publish_all(port, "acknowledge", [orjson.dumps({"request_id": f"probe-{i}", "alarm_id": "x/y"})])
        with contextlib.suppress(AssertionError):
            await wait_until(lambda: any(str(m.data.get("request_id", "")).startswith("probe-")
                                         for m in sub.leaf("reply")), 0.2, "a reply")
            return
    raise AssertionError("the gateway never answered a command")


def refusals(gw: Gateway) -> float:
    return total(gw.metrics.commands, result=("refused", "rejected"))


def registers(station: Station) -> dict[str, list[int]]:
    return {k: list(v) for k, v in station._blocks.items()}  # noqa: SLF001 - the PLC's memory, for comparison


async def test_a_write_reaches_the_plc_and_is_audited(
    live_map: TagMap, stations: dict[str, Station], mosquitto: Mosquitto, tmp_path: Path
) -> None:
    tm = with_commands(live_map, writes=True, users=["j.garcia"])
    plc = stations["filling-1-plc"]
    before = plc.snapshot()["speed_setpoint"]
    async with collecting(mosquitto.port, f"{PREFIX}/#") as sub, running(tm, tmp_path / "b.sqlite"):
        await listening(mosquitto.port, sub)
        await publish_all(mosquitto.port, "write", [orjson.dumps(
            {"request_id": "w1", "asset": "filling-1", "tag": "speed_setpoint", "value": 80.0, "user": "j.garcia",
             "comment": "slower for the new bottles"})])
        await wait_until(lambda: any(m.data.get("request_id") == "w1" for m in sub.leaf("reply")), 10, "the reply")
        await wait_until(lambda: any(m.data.get("event") == "tag-write" for m in sub.leaf("events")), 10, "audit")
        await wait_until(lambda: any(r["tag"] == "speed_setpoint" and r["value"] == 80.0
                                     for m in sub.leaf("telemetry") if m.data["asset_id"] == "filling-1"
                                     for r in m.data["readings"]), 10, "the new value in telemetry")
    reply = next(m.data for m in sub.leaf("reply") if m.data.get("request_id") == "w1")
    validate("reply", reply)
    assert (reply["ok"], reply["changed"]) == (True, True)
    assert reply["write"] == {"asset_id": "filling-1", "tag": "speed_setpoint", "old": before, "new": 80.0}
    assert plc.snapshot()["speed_setpoint"] == 80.0
    audit = next(m.data for m in sub.leaf("events") if m.data.get("event") == "tag-write")
    validate("events", audit)
    assert (audit["user"], audit["asset_id"], audit["tag"], audit["old_value"], audit["new_value"], audit["ok"],
            audit["comment"], audit["request_id"]) == (
        "j.garcia", "filling-1", "speed_setpoint", before, 80.0, True, "slower for the new bottles", "w1")


def bad_writes(rng: random.Random, n: int) -> list[tuple[str, bytes, str]]:
    """(request_id, payload, expected error fragment) of writes that must change nothing."""
    good = {"asset": "filling-1", "tag": "speed_setpoint", "value": 50.0, "user": "j.garcia"}
    mutations: list[tuple[dict[str, object] | bytes, str]] = [
        ({"value": 120.1}, "above the tag's max 120"),
        ({"value": -5}, "below the tag's min 0"),
        ({"value": "fast"}, "value must be a number"),
        ({"value": True}, "value must be a number"),
        ({"value": None}, "value"),
        ({"value": [50]}, "value"),
        ({"tag": "units_total"}, "is not writable"),
        ({"tag": "motor_temperature"}, "is not writable"),
        ({"tag": "nope"}, "has no tag 'nope'"),
        ({"asset": "filling-9"}, "unknown asset"),
        ({"asset": "reactor-a"}, "unknown asset"),  # not in this gateway's map
        ({"user": "mallory"}, "may not send commands"),
        ({"user": None}, "user"),
        ({"tag": "conveyor_enabled", "value": 1}, "true or false"),
        ({"tag": "target_units_per_hour", "value": 10.5}, "whole number"),
        ({"tag": "target_units_per_hour", "value": 70000}, "above the tag's max"),
        ({"extra": 1}, "extra: Extra inputs are not permitted"),
        (b"{not json", "payload is not JSON"),
        (b'{"asset": "filling-1", "tag": "speed_setpoint", "value": NaN, "user": "j.garcia"}', "not JSON"),
        (b'["filling-1"]', "must be a JSON object"),
    ]
    out = []
    for i in range(n):
        change, error = mutations[i % len(mutations)] if i < len(mutations) else rng.choice(mutations)
        rid = f"bad-{i}"
        if isinstance(change, bytes):
            out.append((rid, change, error))
            continue
        body: dict[str, object] = {**good, **change, "request_id": rid}
        for key in [k for k, v in change.items() if v is None and k != "value"]:
            body.pop(key)
        out.append((rid, orjson.dumps(body), error))
    return out


async def test_malformed_and_forbidden_writes_are_answered_and_write_nothing(
    live_map: TagMap, stations: dict[str, Station], mosquitto: Mosquitto, tmp_path: Path
) -> None:
    tm = with_commands(live_map, writes=True, users=["j.garcia"])
    for s in stations.values():
        s.freeze()
    plc = stations["filling-1-plc"]
    cases = bad_writes(random.Random(11), 200)
    async with collecting(mosquitto.port, f"{PREFIX}/gateways/edge-01/cmd/reply") as sub, \
            running(tm, tmp_path / "b.sqlite") as gw:
        await listening(mosquitto.port, sub)
        sub.messages.clear()
        memory, writes, answered = registers(plc), plc.writes, refusals(gw)
        await publish_all(mosquitto.port, "write", [payload for _, payload, _ in cases])
        await wait_until(lambda: len(sub.messages) >= len(cases), 30, "a reply to every write")
        assert plc.writes == writes, "not one write request reached the PLC"
        assert registers(plc) == memory, "the PLC's memory is unchanged"
        refused = refusals(gw) - answered
    by_id = {m.data.get("request_id"): m.data for m in sub.messages}
    for rid, _payload, error in cases:
        if rid not in by_id:  # unparseable payloads have no request_id to answer with
            continue
        reply = by_id[rid]
        validate("reply", reply)
        assert reply["ok"] is False and error in str(reply["error"]), (rid, error, reply["error"])
    assert all(m.data["ok"] is False for m in sub.messages)
    assert refused == len(cases)


async def test_writes_are_off_by_default_and_commands_unsubscribed_when_all_off(
    live_map: TagMap, stations: dict[str, Station], mosquitto: Mosquitto, tmp_path: Path
) -> None:
    plc = stations["filling-1-plc"]
    alarms_only = with_commands(live_map, alarms=True)
    async with collecting(mosquitto.port, f"{PREFIX}/gateways/edge-01/cmd/reply") as sub, \
            running(alarms_only, tmp_path / "a.sqlite") as gw:
        assert gw.publisher is not None and gw.publisher.on_command is not None
        await listening(mosquitto.port, sub)
        sub.messages.clear()
        writes = plc.writes
        await publish_all(mosquitto.port, "write", [orjson.dumps(
            {"request_id": "w", "asset": "filling-1", "tag": "speed_setpoint", "value": 10, "user": "x"})])
        await wait_until(lambda: bool(sub.messages), 10, "the reply")
        assert "writes are disabled" in str(sub.messages[0].data["error"])
        assert plc.writes == writes
    off = with_commands(live_map)
    assert (off.commands.alarms, off.commands.writes) == (False, False)
    async with running(off, tmp_path / "b.sqlite") as gw:
        assert gw.publisher is not None and gw.publisher.on_command is None, "no command subscription at all"


async def test_a_write_the_plc_does_not_take_is_audited_as_failed(
    live_map: TagMap, stations: dict[str, Station], mosquitto: Mosquitto, tmp_path: Path
) -> None:
    """The PLC goes away between the command and the write: the reply and the audit say so."""
    tm = with_commands(live_map, writes=True)
    plc = stations["filling-1-plc"]
    async with collecting(mosquitto.port, f"{PREFIX}/#") as sub, running(tm, tmp_path / "b.sqlite") as gw:
        await wait_until(lambda: gw.pollers["filling-1-plc"].connected, 10, "the PLC")
        await listening(mosquitto.port, sub)
        await plc.stop()
        await wait_until(lambda: not gw.pollers["filling-1-plc"].connected, 10, "the PLC to be gone")
        await publish_all(mosquitto.port, "write", [orjson.dumps(
            {"request_id": "w2", "asset": "filling-1", "tag": "conveyor_enabled", "value": False, "user": "op"})])
        await wait_until(lambda: any(m.data.get("request_id") == "w2" for m in sub.leaf("reply")), 15, "the reply")
        await wait_until(lambda: any(m.data.get("event") == "tag-write" for m in sub.leaf("events")), 10, "audit")
        await plc.start()
    reply = next(m.data for m in sub.leaf("reply") if m.data.get("request_id") == "w2")
    assert reply["ok"] is False and reply["error"]
    audit = next(m.data for m in sub.leaf("events") if m.data.get("event") == "tag-write")
    validate("events", audit)
    assert (audit["ok"], audit["user"], audit["new_value"]) == (False, "op", False)
    assert audit["error"] == reply["error"]
