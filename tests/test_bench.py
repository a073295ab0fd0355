"""``edge-gateway bench``: its devices, its tag map, and one small run of the whole thing.

The figures the bench reports are measurements, not asserted here; what is asserted is that the
run is what it says it is (every device delivered, values were counted, the outage left a backlog
that drained, nothing was lost in between).
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.bench import BenchConfig, Report, bench, notes, table, tag_map_yaml
from gateway.brokers import find_mosquitto
from gateway.tagmap import load_tag_map
from simulators.bench import Layout, ModbusDevice, _ModbusProtocol


def _request(tid: int, fc: int, start: int, count: int, unit: int = 1) -> bytes:
    return struct.pack(">HHHBBHH", tid, 0, 6, unit, fc, start, count)


@given(tags=st.integers(2, 300), start=st.integers(0, 400), count=st.integers(0, 130), fc=st.sampled_from([3, 4]))
def test_the_bench_device_answers_reads_like_a_plc(tags: int, start: int, count: int, fc: int) -> None:
    device = ModbusDevice(Layout(tags))
    device.update(1.8e9)
    reply = device.answer(_request(7, fc, start, count))
    tid, proto, length, unit, code = struct.unpack_from(">HHHBB", reply)
    assert (tid, proto, unit) == (7, 0, 1)
    assert length == len(reply) - 6
    if 1 <= count <= 125 and start + count <= Layout(tags).registers:
        assert code == fc
        assert reply[9:] == device.image[start * 2:(start + count) * 2]
    else:
        assert (code, reply[8]) == (fc | 0x80, 2), "illegal data address"


def test_the_bench_device_refuses_other_functions_and_splits_frames() -> None:
    device = ModbusDevice(Layout(10))
    device.update(1.8e9)
    reply = device.answer(_request(1, 6, 0, 1))
    assert reply[7:9] == bytes([6 | 0x80, 1]), "illegal function"

    sent: list[bytes] = []

    class Transport:
        def write(self, data: bytes) -> None:
            sent.append(data)

        def close(self) -> None:
            sent.append(b"closed")

    proto = _ModbusProtocol(device)
    proto.connection_made(Transport())  # type: ignore[arg-type]
    frames = _request(1, 3, 0, 4) + _request(2, 3, 4, 2)
    proto.data_received(frames[:5])
    proto.data_received(frames[5:15])
    proto.data_received(frames[15:])
    assert [struct.unpack_from(">H", r)[0] for r in sent] == [1, 2], "two frames, each answered, in order"
    assert struct.unpack_from(">d", sent[0], 9)[0] == 1.8e9, "changed_at is the time of the change"
    proto.data_received(b"GET / HTTP/1.1\r\n")
    assert sent[-1] == b"closed", "not Modbus: the connection is dropped"


def test_the_layout_and_tag_map_agree(tmp_path: Path) -> None:
    cfg = BenchConfig(devices=3, tags=40, opcua=1, deadband=0.5, max_silence=30)
    path = tmp_path / "bench.yaml"
    path.write_text(tag_map_yaml(cfg, mqtt_port=1883, modbus_ports=[5020, 5021], opcua_ports=[4840]))
    tm = load_tag_map(path)
    assert [d.id for d in tm.devices] == ["mb-000", "mb-001", "ua-000"]
    assert all(len(a.tags) == 40 for a in tm.assets)
    fields = Layout(40).fields()
    asset = tm.assets[0]
    for name, kind, address in fields:
        tag = asset.tags[name]
        assert (tag.address, tag.type.value if hasattr(tag.type, "value") else tag.type) == (address, kind)  # type: ignore[union-attr]
    assert asset.tags["v0001"].deadband == 0.5 and asset.tags["changed_at"].deadband is None
    assert len(asset.rules) == 1 + len(fields[1::10])


def test_a_large_map_of_identical_plcs_shares_one_register_map(tmp_path: Path) -> None:
    """40 PLCs x 500 tags through one anchor: far more aliased values than an alias bomb guard may
    refuse by mistake."""
    cfg = BenchConfig(devices=40, tags=500)
    path = tmp_path / "bench.yaml"
    path.write_text(tag_map_yaml(cfg, mqtt_port=1883, modbus_ports=list(range(5000, 5040)), opcua_ports=[]))
    assert path.read_text().count("v0001:") == 1
    tm = load_tag_map(path)
    assert sum(len(a.tags) for a in tm.assets) == 20_000


HEALTHY = {"gateway_cores": 0.3, "simulator_cores": 0.1, "values_per_s": 10_000, "values_polled_per_s": 10_000,
           "mqtt_messages_per_value": 0.002, "buffer_rows_growth": 3}


@pytest.mark.parametrize(("live", "drained", "expected"), [
    (HEALTHY, True, []),
    ({**HEALTHY, "gateway_cores": 0.95}, True, ["the gateway used a full core"]),
    ({**HEALTHY, "simulator_cores": 1.9}, True, ["the simulator processes were saturated"]),
    ({**HEALTHY, "values_polled_per_s": 8_900}, True, ["polling fell behind the interval: 8900 of 10000"]),
    ({**HEALTHY, "values_polled_per_s": 9_100}, True, []),
    ({**HEALTHY, "buffer_rows_growth": 41}, True, ["publishing fell behind polling: the buffer grew by 41"]),
    ({**HEALTHY, "buffer_rows_growth": 40}, True, []),  # 2 per device, or a second of messages: in flight
    (HEALTHY, False, ["the backlog did not drain within 160.0 s"]),
    ({**HEALTHY, "values_polled_per_s": 1_000, "buffer_rows_growth": 900, "gateway_cores": 1.0}, False,
     ["the gateway used a full core", "polling fell behind", "publishing fell behind", "did not drain"]),
])
def test_bench_notes_say_what_limited_the_run(live: dict[str, object], drained: bool, expected: list[str]) -> None:
    """20 Modbus devices x 500 tags @ 1 s ask for 10,000 values/s."""
    cfg = BenchConfig(devices=20, tags=500, interval=1.0, sim_procs=2)
    report = Report(config={}, machine={}, live=live, drain={"drained": drained, "drain_s": 160.0})
    got = notes(cfg, report, cores=8)
    assert len(got) == len(expected), got
    for note, start in zip(got, expected, strict=True):
        assert start in note, (start, note)
    assert notes(cfg, report, cores=2)[-1] == "2 cores shared by gateway, simulators, broker and subscriber"


def test_subscribed_opcua_devices_are_not_expected_to_send_every_interval() -> None:
    cfg = BenchConfig(devices=4, tags=100, opcua=2, interval=0.5, opcua_mode="subscribe")
    live = {**HEALTHY, "values_polled_per_s": 2 * 100 / 0.5}  # the two Modbus devices only
    assert notes(cfg, Report(config={}, machine={}, live=live), cores=8) == []
    cfg = BenchConfig(devices=4, tags=100, opcua=2, interval=0.5, opcua_mode="poll")
    assert "polling fell behind the interval: 400 of 800" in notes(
        cfg, Report(config={}, machine={}, live=live), cores=8)[0]


@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
async def test_a_small_bench_run_delivers_every_value_and_drains_its_backlog(tmp_path: Path) -> None:
    cfg = BenchConfig(devices=3, tags=60, opcua=1, interval=0.2, duration=2, warmup=0.5, outage=1.5, sim_procs=2)
    report = await bench(cfg, workdir=tmp_path)
    live, drain = report.live, report.drain
    assert live["values"] > 0 and live["latency_samples"] > 0
    assert live["values_polled_per_s"] > 0
    assert drain["backlog_values"] > 0 and drain["backlog_rows"] > 0 and drain["drained"] is True
    assert drain["values_per_s"] is not None and drain["values_per_s"] > 0
    lat = live["latency_ms"]
    assert isinstance(lat, dict) and 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    text = table(report)
    assert "values delivered /s" in text and "drain" in text
    assert report.config["total_tags"] == 180
    check = report.delivery
    assert check["messages"] > 0 and check["missing"] == 0, check
