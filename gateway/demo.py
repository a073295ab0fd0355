"""``edge-gateway demo`` and ``simulate``: the bundled station simulators, a broker, the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse
from zoneinfo import ZoneInfo

import aiomqtt
import orjson

from simulators.reactors import ReactorServer
from simulators.stations import Kind, Station

from .brokers import Mosquitto, find_mosquitto
from .minibroker import MiniBroker
from .tagmap import ModbusTcpDevice, OpcUaDevice, TagMap

DEMO_TIME_SCALE = 20.0  # plant time runs 20x faster in the demo, so counters visibly move and wrap


def stations_for(tag_map: TagMap, *, seed: int = 1, time_scale: float = 1.0,
                 any_port: bool = False) -> dict[str, Station]:
    """A station simulator for every Modbus device of the map, on the device's port (or any)."""
    out = {}
    kinds = list(Kind)
    for i, dev in enumerate(d for d in tag_map.devices if isinstance(d, ModbusTcpDevice)):
        kind = next((k for k in kinds if dev.id.startswith(k.value)), kinds[i % len(kinds)])
        out[dev.id] = Station(
            dev.id, kind, host=dev.host, port=0 if any_port else dev.port, unit=dev.unit,
            seed=seed + i, time_scale=time_scale,
            units_start=(1 << 32) - 300 if kind is Kind.FILLING else 1000 * i,
        )
    return out


OFF_SPEC = 0.2  # share of the simulated batches that run out of tolerance (seeded), so some records fail


def reactors_for(tag_map: TagMap, *, seed: int = 1, time_scale: float = 1.0,
                 any_port: bool = False, off_spec: float = OFF_SPEC) -> dict[str, ReactorServer]:
    """A reactor simulator for every OPC-UA device of the map, on the endpoint's port (or any)."""
    out = {}
    for dev in tag_map.devices:
        if isinstance(dev, OpcUaDevice):
            url = urlparse(dev.endpoint)
            out[dev.id] = ReactorServer(host=url.hostname or "127.0.0.1", port=0 if any_port else (url.port or 4840),
                                        seed=seed, time_scale=time_scale, off_spec=off_spec)
    return out


def with_endpoints(tag_map: TagMap, *, mqtt_port: int | None = None,
                   stations: dict[str, Station] | None = None,
                   reactors: dict[str, ReactorServer] | None = None) -> TagMap:
    """A copy of the map pointing at a local broker and at the simulators' actual ports."""
    update: dict[str, object] = {}
    if mqtt_port is not None:
        update["mqtt"] = tag_map.mqtt.model_copy(update={"host": "127.0.0.1", "port": mqtt_port})
    stations, reactors = stations or {}, reactors or {}
    devices = []
    for d in tag_map.devices:
        if d.id in stations:
            d = d.model_copy(update={"host": stations[d.id].host, "port": stations[d.id].port})
        elif d.id in reactors:
            d = d.model_copy(update={"endpoint": reactors[d.id].endpoint})
        devices.append(d)
    update["devices"] = devices
    return tag_map.model_copy(update=update)


async def simulate(tag_map: TagMap, *, seed: int, time_scale: float, shutdown: asyncio.Event) -> int:
    stations = stations_for(tag_map, seed=seed, time_scale=time_scale)
    reactors = reactors_for(tag_map, seed=seed, time_scale=time_scale)
    try:
        for dev_id, st in stations.items():
            await st.start()
            print(f"{dev_id}: {st.kind} station on {st.host}:{st.port} unit {st.unit}", flush=True)
        for dev_id, rs in reactors.items():
            await rs.start()
            print(f"{dev_id}: reactors {', '.join(rs.models)} on {rs.endpoint} ({rs.namespace})", flush=True)
        await shutdown.wait()
    finally:
        for st in stations.values():
            await st.stop()
        for rs in reactors.values():
            await rs.stop()
    return 0


async def demo(tag_map: TagMap, *, duration: float | None, shutdown: asyncio.Event,
               broker: str = "auto") -> int:
    from .app import Gateway
    from .logs import configure
    from .settings import Settings

    configure("console", "warning")
    workdir = Path(tempfile.mkdtemp(prefix="edge-gateway-demo-"))
    mosquitto: Mosquitto | None = None
    mini: MiniBroker | None = None
    if broker == "mosquitto" or (broker == "auto" and find_mosquitto()):
        mosquitto = Mosquitto(workdir=workdir)
        mosquitto.start()
        port, name = mosquitto.port, f"mosquitto (pid {mosquitto.proc.pid if mosquitto.proc else '?'})"
    else:
        mini = MiniBroker()
        await mini.start()
        port, name = mini.port, "embedded demo broker (install mosquitto for the real thing)"
    stations = stations_for(tag_map, any_port=True, time_scale=DEMO_TIME_SCALE)
    reactors = reactors_for(tag_map, any_port=True, time_scale=DEMO_TIME_SCALE)
    for st in stations.values():
        await st.start()
    for rs in reactors.values():
        await rs.start()
    tm = _scaled(with_endpoints(tag_map, mqtt_port=port, stations=stations, reactors=reactors), DEMO_TIME_SCALE)
    tm = _minute_shifts(tm, time.time())
    print(f"shifts: one a minute for the demo ({', '.join(tm.gateway.shifts[:3])}, ...): a production summary "
          f"per station at each (the simulators run {DEMO_TIME_SCALE:g}x faster than the clock: so does "
          "performance)")
    print(f"broker: {name} on 127.0.0.1:{port}")
    print(f"stations: {', '.join(f'{k}@{s.port}' for k, s in stations.items())}")
    print(f"reactors: {', '.join(f'{k}@{r.endpoint}' for k, r in reactors.items())}")
    print(f"buffer: {workdir / 'buffer.sqlite'}")
    print(f"subscribed to {tm.mqtt.topic_prefix}/#  (Ctrl-C to stop)\n", flush=True)
    gateway = Gateway(tm, Settings(http_address="127.0.0.1:0"), buffer_path=workdir / "buffer.sqlite")
    stop_gateway = asyncio.Event()
    latencies: list[float] = []
    try:
        async with asyncio.TaskGroup() as tg:
            gw = tg.create_task(gateway.run(stop_gateway), name="gateway")
            view = tg.create_task(_view(tm, port, latencies), name="viewer")
            spike = tg.create_task(_pressure_spike(reactors), name="demo-spike")
            await gateway.ready.wait()
            if gateway.http is not None:
                print(f"health: http://127.0.0.1:{gateway.http.port}/healthz  "
                      f"metrics: http://127.0.0.1:{gateway.http.port}/metrics\n", flush=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(duration):
                    await shutdown.wait()
            stop_gateway.set()
            spike.cancel()
            await gw
            view.cancel()
    finally:
        for st in stations.values():
            await st.stop()
        for rs in reactors.values():
            await rs.stop()
        if mosquitto:
            mosquitto.stop()
        if mini:
            await mini.stop()
    _summary(latencies)
    return 0 if latencies else 1


DEMO_SHIFTS = 30  # the demo's shifts: one a minute, from the next minute on


def _minute_shifts(tm: TagMap, now: float) -> TagMap:
    """The map with a shift starting every minute for the next DEMO_SHIFTS minutes (local time), so the
    demo shows production summaries; the last one runs until the first comes round the next day."""
    local = datetime.fromtimestamp(now, ZoneInfo(tm.gateway.timezone)).replace(second=0, microsecond=0)
    starts = sorted({(local + timedelta(minutes=i)).strftime("%H:%M") for i in range(1, DEMO_SHIFTS + 1)})
    gateway = tm.gateway.model_copy(update={"shifts": starts, "shift_names": None})
    return tm.model_copy(update={"gateway": gateway})


def _scaled(tm: TagMap, scale: float) -> TagMap:
    """The map with batch durations in the simulators' faster plant time (progress in the demo)."""
    assets = [a if a.batch is None or a.batch.expected_duration is None else a.model_copy(update={
        "batch": a.batch.model_copy(update={"expected_duration": a.batch.expected_duration / scale})})
        for a in tm.assets]
    return tm.model_copy(update={"assets": assets})


async def _view(tm: TagMap, port: int, latencies: list[float]) -> None:
    prefix = tm.mqtt.topic_prefix
    while True:
        try:
            async with aiomqtt.Client("127.0.0.1", port, identifier="edge-gateway-demo-viewer") as client:
                await client.subscribe(f"{prefix}/#", qos=1)
                async for msg in client.messages:
                    _show(str(msg.topic), msg.payload, latencies)
        except aiomqtt.MqttError:
            await asyncio.sleep(0.5)


SPIKE_AT, SPIKE_FOR = 15.0, 20.0  # seconds into the demo; how long the injected pressure spike lasts


async def _pressure_spike(reactors: dict[str, ReactorServer]) -> None:
    """Show the alarm lifecycle: a pressure spike on the last reactor, raised then cleared."""
    server = next(iter(reactors.values()), None)
    if server is None:
        return
    letter = list(server.models)[-1]
    model = server.models[letter]
    await asyncio.sleep(SPIKE_AT)
    print(f"demo: pressure spike injected on reactor {letter} for {SPIKE_FOR:g} s (PROD010 expected)", flush=True)
    model.faults.pressure_offset = 2.0
    try:
        await asyncio.sleep(SPIKE_FOR)
    finally:
        model.faults.pressure_offset = 0.0
    print(f"demo: pressure spike on reactor {letter} removed", flush=True)


def _show(topic: str, payload: object, latencies: list[float]) -> None:
    if not isinstance(payload, (bytes, bytearray)):
        return
    data = orjson.loads(payload)
    leaf = topic.rsplit("/", 1)[-1]
    now = time.time()
    if leaf == "telemetry":
        for r in data["readings"][:1]:
            latencies.append(now - datetime.fromisoformat(r["ts"]).timestamp())
    elif leaf == "state":
        v = data["values"]
        middle = _reactor_line(v) if data["kind"] == "reactor" else _station_line(v)
        print(f"{data['ts'][11:23]}  {data['asset_id']:<12} {v.get('status', '?')!s:<11} {middle}  "
              f"{_quality(data['quality'], data['reasons'])}", flush=True)
    elif leaf == "alerts":
        batch = f"  [batch {data['batch_id']}]" if data.get("batch_id") else ""
        print(f"{data['ts'][11:23]}  {data['asset_id']:<12} ALARM {data['state']:<15} {data['severity']:<8} "
              f"{data['code']}  {data['message']}{batch}", flush=True)
    elif leaf == "events" and data["event"] == "batch-status-change":
        progress = data.get("progress_percentage")
        print(f"{data['ts'][11:23]}  {data['asset_id']:<12} BATCH {data['batch_id']} ({data['recipe_id']}) "
              f"{data['old_status']} -> {data['new_status']}"
              + (f"  {progress:.0f}%" if isinstance(progress, (int, float)) else ""), flush=True)
    elif leaf == "events":
        print(f"{data['ts'][11:23]}  {data['asset_id']:<12} EVENT status {data['old_status']} -> "
              f"{data['new_status']}", flush=True)
    elif leaf == "batches":
        _show_record(data)
    elif leaf == "shifts":
        print(f"{data['ts'][11:23]}  {data['asset_id']:<12} SHIFT {data['shift_date']} #{data['shift']} "
              f"{data['start'][11:16]}-{data['end'][11:16]} UTC: {data['units_produced']} units, run "
              f"{data['run_time_hours'] * 60:.1f} min, down {data['downtime_total_minutes']:.1f} min, availability "
              f"{_percent(_times100(data['availability']))}, performance {_percent(_times100(data['performance']))}"
              + ("" if data["complete"] else f", {data['missing_minutes']:.1f} min not seen (the gateway started "
                                              "during it)"), flush=True)
    elif leaf == "status":
        print(f"gateway {data['gateway_id']} is {data['state']} (version {data['version']})", flush=True)


def _quality(quality: dict[str, str], reasons: dict[str, str | None]) -> str:
    """Good, or which values are not and why in a few words: derived values that are still warming up
    (a rate needs a minute of counts, a day's count starts with the gateway) are not faults."""
    bad = [t for t, q in quality.items() if q == "bad"]
    waiting = [t for t, q in quality.items() if q == "uncertain"
               and any(w in (reasons.get(t) or "") for w in ("warming up", "counting since"))]
    other = [t for t, q in quality.items() if q == "uncertain" and t not in waiting]
    parts = [f"{len(bad)} bad ({reasons.get(bad[0])})"] if bad else []
    if waiting:
        parts.append(f"warming up, as at every start: {', '.join(waiting)}")
    if other:
        parts.append(f"{len(other)} uncertain ({reasons.get(other[0])})")
    return "; ".join(parts) or "all good"


def _show_record(data: dict[str, object]) -> None:
    """A finished batch's record: pass or fail, and each critical parameter's result."""
    verdict = "PASSED" if data["passed"] else "FAILED"
    print(f"{str(data['ts'])[11:23]}  {data['asset_id']!s:<12} BATCH RECORD {data['batch_id']} ({data['recipe_id']}) "
          f"{verdict} after {float(data['duration_s']):.0f} s"  # type: ignore[arg-type]
          + ("" if data["complete"] else "  (not seen whole: started before the gateway saw it, or with gaps)"),
          flush=True)
    for p in data["parameters"]:  # type: ignore[attr-defined]
        low, high = p["tolerance_min"], p["tolerance_max"]
        band = f"[{'' if low is None else _num(low, 2)} .. {'' if high is None else _num(high, 2)}]"
        print(f"{'':26}{p['parameter_name']:<12} mean {_num(p['mean'], 2):>7}  min {_num(p['min'], 2):>7}  "
              f"max {_num(p['max'], 2):>7}  band {band:<18} {'ok' if p['passed'] else 'FAIL: ' + p['reason']}",
              flush=True)


def _reactor_line(v: dict[str, object]) -> str:
    return (f"T {_num(v.get('temperature')):>5} degC (sp {_num(v.get('temperature_setpoint'))})  "
            f"p {_num(v.get('pressure'), 3)} bar  pH {_num(v.get('ph_level'), 2)} "
            f"(target {_num(v.get('ph_target'), 1)})  {v.get('batch_id')}")


def _station_line(v: dict[str, object]) -> str:
    return (f"units {v.get('units_total')!s:>10}  {_num(v.get('units_per_hour')):>7} u/h "
            f"(target {v.get('target_units_per_hour')})  motor {_num(v.get('motor_temperature'))} degC  "
            f"avail {_percent(v.get('availability'))}  errors today {v.get('errors_today')}")


def _times100(x: object) -> object:
    return x * 100 if isinstance(x, (int, float)) else x


def _percent(x: object) -> str:
    return f"{x:.0f}%" if isinstance(x, (int, float)) else "(from the first minute)"


def _num(x: object, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def _summary(latencies: list[float]) -> None:
    if not latencies:
        print("\nno telemetry arrived", file=sys.stderr)
        return
    ordered = sorted(latencies)
    p95 = ordered[int(0.95 * (len(ordered) - 1))]
    print(f"\n{len(latencies)} telemetry messages; poll-to-subscriber latency "
          f"median {statistics.median(ordered) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
          f"max {ordered[-1] * 1000:.1f} ms")
