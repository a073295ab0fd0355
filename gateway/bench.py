"""``edge-gateway bench``: the whole path under load, measured from outside the gateway.

Simulated devices (``simulators.bench``, in their own processes) -> the gateway (its own process,
rules on, every value through its SQLite buffer, QoS 1) -> a private Mosquitto -> a subscriber here
that counts what arrives and how late. Then the broker is stopped for ``--outage`` seconds and the
backlog drain is measured while live data keeps flowing. CPU and peak RSS come from /proc, by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import aiomqtt
import orjson

from simulators.bench import Layout

from .brokers import Mosquitto, free_port

PREFIX = "bench"
TICK = os.sysconf("SC_CLK_TCK")
RULE_EVERY = 10  # one limit rule per 10 value tags
CHANGE_DETUNE = 1.013  # default change period / poll interval


@dataclass(frozen=True)
class BenchConfig:
    devices: int = 20
    tags: int = 500  # per device, changed_at included
    opcua: int = 0  # how many of the devices are OPC-UA servers (the rest Modbus TCP)
    interval: float = 1.0  # poll interval (OPC-UA: publishing interval)
    # seconds between value changes in the simulators; by default a little slower than the poll, so
    # changes fall at every phase of the poll cycle and the latency covers the wait for the next poll
    change: float | None = None
    changing: float = 1.0  # share of tags that move at each change
    duration: float = 20.0
    warmup: float = 5.0
    outage: float = 10.0  # broker down for this long, then the drain is measured (0: skip)
    sim_procs: int = 2
    loop: str = "asyncio"  # or uvloop
    deadband: float | None = None  # absolute deadband on every value tag (report by exception)
    deadband_percent: float | None = None
    max_silence: float | None = None
    rules: bool = True
    max_inflight: int = 64
    opcua_mode: str = "subscribe"

    @property
    def total_tags(self) -> int:
        return self.devices * self.tags

    @property
    def processes(self) -> int:
        """Simulator processes started: no more than there are devices."""
        return max(1, min(self.sim_procs, self.devices))


@dataclass
class Sample:
    """Counters at one moment."""

    t: float
    values: int
    messages: int
    payload_bytes: int
    gateway_cpu: float
    sim_cpu: float
    broker_cpu: float
    own_cpu: float
    readings: float
    rows: float


@dataclass
class Report:
    config: dict[str, object]
    machine: dict[str, object]
    live: dict[str, object] = field(default_factory=dict)
    drain: dict[str, object] = field(default_factory=dict)
    delivery: dict[str, int] = field(default_factory=dict)  # what the subscriber saw of the seq numbers
    notes: list[str] = field(default_factory=list)


# -- the tag map -----------------------------------------------------------------------------------
def tag_map_yaml(cfg: BenchConfig, *, mqtt_port: int, modbus_ports: list[int], opcua_ports: list[int]) -> str:
    """A tag map for the bench devices (the same register map on every Modbus device)."""
    fields = Layout(cfg.tags).fields()
    band = ""
    if cfg.deadband is not None:
        band += f", deadband: {cfg.deadband}"
    if cfg.deadband_percent is not None:  # a percent of the span: the simulated values lie in 0..100
        band += f", deadband_percent: {cfg.deadband_percent}, min: 0, max: 100"
    silence = f", max_silence: {cfg.max_silence}s" if cfg.max_silence is not None else ""
    lines = [
        "gateway: {id: bench-01, site: bench}",
        f"mqtt: {{host: 127.0.0.1, port: {mqtt_port}, topic_prefix: {PREFIX}, max_inflight: {cfg.max_inflight}}}",
        "devices:",
    ]
    timeout = max(0.5, min(2.0, cfg.interval * 2))
    for i, port in enumerate(modbus_ports):
        lines.append(f"  - {{id: mb-{i:03d}, protocol: modbus_tcp, host: 127.0.0.1, port: {port}, unit: 1, "
                     f"interval: {cfg.interval}s, timeout: {timeout}s}}")
    for i, port in enumerate(opcua_ports):
        lines.append(f"  - {{id: ua-{i:03d}, protocol: opcua, endpoint: 'opc.tcp://127.0.0.1:{port}/bench', "
                     f"mode: {cfg.opcua_mode}, interval: {cfg.interval}s, timeout: 2s}}")
    # Identical PLCs share one register map (an anchor), as a plant's tag map does.
    for proto, anchor in (("modbus", "mb_tags"), ("opcua", "ua_tags")):
        if (modbus_ports if proto == "modbus" else opcua_ports):
            lines.append(f"x-{anchor}: &{anchor}")
            for name, kind, address in fields:
                if proto == "opcua":
                    spec = f"node: 'nsu=urn:edge-gateway:bench;s=Dev.{name}', type: float"
                elif kind == "int16":
                    spec = f"table: holding, address: {address}, type: int16, scale: 0.1"
                else:
                    spec = f"table: holding, address: {address}, type: {kind}"
                extra = "" if name == "changed_at" else band
                if not (proto == "opcua" and cfg.opcua_mode == "subscribe"):  # a subscription sends changes only
                    extra += silence
                lines.append(f"  {name}: {{{spec}{extra}}}")
    rules = ""
    if cfg.rules:
        lines.append("x-rules: &rules")
        lines.append("  - {tag: changed_at, kind: comm_lost, delay: 10s, severity: high, code: COMM_LOST}")
        for name, _, _ in fields[1::RULE_EVERY]:
            lines.append(f"  - {{tag: {name}, kind: high, limit: 99, deadband: 1, delay: 5s, severity: medium, "
                         "code: BENCH_HIGH}")
        rules = ", rules: *rules"
    lines.append("assets:")
    devices = [f"mb-{i:03d}" for i in range(len(modbus_ports))] + [f"ua-{i:03d}" for i in range(len(opcua_ports))]
    for device in devices:
        tags = "*ua_tags" if device.startswith("ua-") else "*mb_tags"
        lines.append(f"  - {{id: {device}, kind: station, name: 'Bench {device}', device: {device}, "
                     f"tags: {tags}{rules}}}")
    return "\n".join(lines) + "\n"


# -- processes -------------------------------------------------------------------------------------
def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process (0 once it is gone)."""
    try:
        parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(parts[11]) + int(parts[12])) / TICK


def _peak_rss(pid: int) -> int:
    """VmHWM: the peak resident set size, in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _metrics(url: str) -> dict[str, float]:
    """Sums of the gateway's Prometheus series by name (labels added up)."""
    out: dict[str, float] = {}
    try:
        text = urllib.request.urlopen(url, timeout=2).read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\s+(\S+)", line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


class Subscriber:
    """Counts telemetry values as they arrive; the first arrival of each changed_at gives a latency."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.values = self.messages = self.payload_bytes = 0
        self.latencies: list[tuple[float, float]] = []  # (arrival, seconds from the value's change)
        self.internal: list[tuple[float, float]] = []  # (arrival, seconds from the gateway's read)
        self.assets: set[str] = set()
        self._last_stamp: dict[str, float] = {}
        self.seqs: set[int] = set()
        self.duplicates = 0
        self.connected = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", self.port, identifier="bench-subscriber",
                                          clean_session=False, max_queued_incoming_messages=0) as client:
                    await client.subscribe(f"{PREFIX}/+/+/telemetry", qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        self._count(message.payload)
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.1)

    def check(self) -> dict[str, int]:
        """Every seq between the first and the last one seen arrived (every message is telemetry here:
        the bench's rules never fire and its devices have no status tag)."""
        if not self.seqs:
            return {"messages": 0, "missing": 0, "duplicates": self.duplicates}
        first, last = min(self.seqs), max(self.seqs)
        return {"messages": len(self.seqs), "first_seq": first, "last_seq": last,
                "missing": last - first + 1 - len(self.seqs), "duplicates": self.duplicates}

    def _count(self, payload: bytes) -> None:
        now = time.time()
        data = orjson.loads(payload)
        readings = data["readings"]
        seq = data["seq"]
        if seq in self.seqs:
            self.duplicates += 1
            return
        self.seqs.add(seq)
        self.messages += 1
        self.payload_bytes += len(payload)
        self.values += len(readings)
        asset = data["asset_id"]
        self.assets.add(asset)
        first = readings[0] if readings else None
        if first is not None and first["tag"] == "changed_at" and isinstance(first["value"], float):
            stamp = first["value"]
            if self._last_stamp.get(asset) != stamp:
                self._last_stamp[asset] = stamp
                self.latencies.append((now, now - stamp))
                read = datetime.fromisoformat(first["ts"]).timestamp()
                self.internal.append((now, now - read))


class Bench:
    def __init__(self, cfg: BenchConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.sims: list[subprocess.Popen[bytes]] = []
        self.gateway: subprocess.Popen[bytes] | None = None
        self.broker: Mosquitto | None = None
        self.http_port = free_port()
        self.buffer = workdir / "buffer.sqlite"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metrics"

    # -- starting and stopping ---------------------------------------------------------------------
    def start_simulators(self) -> tuple[list[int], list[int]]:
        cfg = self.cfg
        procs = cfg.processes
        modbus = cfg.devices - cfg.opcua
        files = []
        for p in range(procs):
            n_mb = len(range(p, modbus, procs))
            n_ua = len(range(p, cfg.opcua, procs))
            if not n_mb and not n_ua:
                continue
            ports = self.workdir / f"sim-{p}.json"
            files.append(ports)
            self.sims.append(subprocess.Popen(
                [sys.executable, "-m", "simulators.bench", "--modbus", str(n_mb), "--opcua", str(n_ua),
                 "--tags", str(cfg.tags), "--change", str(cfg.change or cfg.interval * CHANGE_DETUNE),
                 "--changing", str(cfg.changing), "--ports-file", str(ports)],
                stdout=subprocess.DEVNULL, stderr=open(self.workdir / f"sim-{p}.log", "wb"),  # noqa: SIM115
                start_new_session=True))
        deadline = time.monotonic() + 30 + cfg.opcua * 5
        while not all(f.exists() for f in files):
            dead = [p for p in self.sims if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"simulators did not start: {self._logs('sim-*.log')}")
            time.sleep(0.05)
        mb: list[int] = []
        ua: list[int] = []
        for f in files:
            ports = json.loads(f.read_text())
            mb += ports["modbus"]
            ua += ports["opcua"]
        return mb, ua

    def start_gateway(self, config: Path) -> None:
        env = {**os.environ, "EDGE_GATEWAY_BUFFER_PATH": str(self.buffer),
               "EDGE_GATEWAY_HTTP_ADDRESS": f"127.0.0.1:{self.http_port}", "EDGE_GATEWAY_LOG_LEVEL": "warning",
               "EDGE_GATEWAY_LOG_FORMAT": "console", "EDGE_GATEWAY_EVENT_LOOP": self.cfg.loop}
        self.gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config)], env=env,
            stdout=open(self.workdir / "gateway.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True)

    def stop(self) -> None:
        """Everything this bench started, by pid."""
        procs = ([self.gateway] if self.gateway is not None else []) + self.sims
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.broker is not None:
            with contextlib.suppress(RuntimeError):
                self.broker.stop()

    def _logs(self, pattern: str) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(self.workdir.glob(pattern)))

    def _check_alive(self) -> None:
        if self.gateway is not None and self.gateway.poll() is not None:
            raise RuntimeError(f"the gateway exited ({self.gateway.returncode}): {self._logs('gateway.log')}")

    # -- measuring ---------------------------------------------------------------------------------
    def sample(self, sub: Subscriber) -> Sample:
        m = _metrics(self.metrics_url)
        assert self.gateway is not None
        return Sample(
            t=time.monotonic(), values=sub.values, messages=sub.messages, payload_bytes=sub.payload_bytes,
            gateway_cpu=_cpu(self.gateway.pid), sim_cpu=sum(_cpu(p.pid) for p in self.sims),
            broker_cpu=_cpu(self.broker.proc.pid) if self.broker and self.broker.proc else 0.0,
            own_cpu=sum(os.times()[:2]), readings=m.get("gateway_readings_total", 0.0),
            rows=m.get("gateway_buffer_rows", 0.0))

    async def wait(self, what: str, timeout: float, condition: object) -> None:
        deadline = time.monotonic() + timeout
        while not condition():  # type: ignore[operator]
            self._check_alive()
            if time.monotonic() > deadline:
                raise NotInTime(f"bench: {what} did not happen within {timeout:g}s\n{self._logs('gateway.log')}")
            await asyncio.sleep(0.05)

    async def run(self) -> Report:
        cfg = self.cfg
        report = Report(config={**asdict(cfg), "total_tags": cfg.total_tags}, machine=_machine())
        mb, ua = self.start_simulators()
        (self.workdir / "mosquitto").mkdir(exist_ok=True)
        self.broker = Mosquitto(workdir=self.workdir / "mosquitto")
        self.broker.start()
        config = self.workdir / "bench.yaml"
        config.write_text(tag_map_yaml(cfg, mqtt_port=self.broker.port, modbus_ports=mb, opcua_ports=ua))
        sub = Subscriber(self.broker.port)
        listener = asyncio.create_task(sub.run())
        try:
            await asyncio.wait_for(sub.connected.wait(), 10)
            self.start_gateway(config)
            await self.wait("the gateway's metrics endpoint", 30,
                            lambda: "gateway_mqtt_connected" in _metrics(self.metrics_url))
            await self.wait("telemetry from every device", 60 + cfg.opcua * 5, lambda: len(sub.assets) >= cfg.devices)
            await asyncio.sleep(cfg.warmup)
            report.live = await self._live(sub)
            if cfg.outage > 0:
                report.drain = await self._drain(sub, report.live)
        finally:  # the processes are stopped by bench(), also when starting them failed
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        report.delivery = sub.check()
        report.notes += notes(cfg, report, os.cpu_count() or 1)
        return report

    async def _live(self, sub: Subscriber) -> dict[str, object]:
        a = self.sample(sub)
        await asyncio.sleep(self.cfg.duration)
        b = self.sample(sub)
        self._check_alive()
        assert self.gateway is not None
        since = time.time() - (b.t - a.t)
        lat = sorted(late for at, late in sub.latencies if at >= since)
        return _rates(a, b) | {
            "latency_ms": _percentiles(lat),
            "read_to_delivery_ms": _percentiles(sorted(late for at, late in sub.internal if at >= since)),
            "latency_samples": len(lat),
            "gateway_peak_rss_mb": round(_peak_rss(self.gateway.pid) / 2**20, 1),
        }

    async def _drain(self, sub: Subscriber, live: dict[str, object]) -> dict[str, object]:
        """Broker down for ``outage`` s while polling goes on, then back: how fast the backlog leaves
        (from the gateway's reconnect until the buffer holds no more than a live cycle's rows)."""
        assert self.broker is not None
        used0 = _used_bytes(self.buffer)
        a = self.sample(sub)
        self.broker.stop()
        await asyncio.sleep(self.cfg.outage)
        b = self.sample(sub)
        used1 = _used_bytes(self.buffer)
        buffered = b.readings - a.readings
        self.broker.start()
        await self.wait("the gateway to reconnect", 60,
                        lambda: _metrics(self.metrics_url).get("gateway_mqtt_connected") == 1.0)
        started = self.sample(sub)
        # Drained: no more rows waiting than are only in passage at the live rate.
        settled = _in_flight(self.cfg, live, seconds=0.5)
        drained = True
        try:  # an overloaded gateway never drains: report what it managed instead of failing
            await self.wait("the backlog to drain", max(60.0, 20 * self.cfg.outage), lambda: _metrics(
                self.metrics_url).get("gateway_buffer_rows", math.inf) <= settled)
        except NotInTime:
            drained = False
        done = self.sample(sub)
        took = done.t - started.t
        # The gateway's side: the backlog plus what was polled meanwhile, all acknowledged by the broker.
        published = buffered + (done.readings - started.readings)
        caught_up = None
        with contextlib.suppress(NotInTime):  # the subscriber's side: when it has them all
            await self.wait("the subscriber to catch up", 120 if drained else 0,
                            lambda: sub.values - a.values >= done.readings - a.readings)
            caught_up = round(time.monotonic() - started.t, 2)
        live_rate = float(live["values_per_s"])  # type: ignore[arg-type]
        rate = published / took if took > 0 else 0.0
        return {
            "outage_s": self.cfg.outage,
            "drained": drained,
            "backlog_rows": int(b.rows),  # at the end of the outage: a small backlog may be gone by reconnect
            "backlog_values": int(buffered),
            "sqlite_bytes_per_value": round((used1 - used0) / buffered, 1) if buffered else None,
            "drain_s": round(took, 2),
            "values_per_s": round(rate),
            "ratio_to_live": round(rate / live_rate, 1) if live_rate else None,
            "values_polled_per_s": round((done.readings - started.readings) / took) if took > 0 else None,
            "gateway_cores": round((done.gateway_cpu - started.gateway_cpu) / took, 2) if took > 0 else None,
            "subscriber_caught_up_s": caught_up,
        }


class NotInTime(RuntimeError):
    """What the bench waited for did not happen in time."""


def notes(cfg: BenchConfig, report: Report, cores: int) -> list[str]:
    """Which side limited the run, and whether the gateway kept up with its own configuration."""
    out = []
    live, drain = report.live, report.drain
    if float(live.get("gateway_cores") or 0) >= 0.9:  # type: ignore[arg-type]
        out.append("the gateway used a full core: it is the limit of this run")
    if float(live.get("simulator_cores") or 0) >= 0.9 * cfg.processes:  # type: ignore[arg-type]
        out.append("the simulator processes were saturated: add --sim-procs or cores")
    # Values the configuration asks to be polled each second (a subscribed OPC-UA device sends changes only).
    polling = cfg.devices - (cfg.opcua if cfg.opcua_mode == "subscribe" else 0)
    asked = polling * cfg.tags / cfg.interval
    polled = float(live.get("values_polled_per_s") or 0)  # type: ignore[arg-type]
    if polling and polled < 0.9 * asked:
        out.append(f"polling fell behind the interval: {polled:.0f} of {asked:.0f} values/s polled "
                   "(gateway_device_poll_overruns counts the cycles missed)")
    grew = float(live.get("buffer_rows_growth") or 0)  # type: ignore[arg-type]
    if grew > _in_flight(cfg, live, seconds=1.0):  # more than a second of messages piled up with the broker up
        out.append(f"publishing fell behind polling: the buffer grew by {grew:.0f} messages with the broker up")
    if drain and drain.get("drained") is False:
        out.append(f"the backlog did not drain within {drain.get('drain_s')} s: publishing cannot outrun polling "
                   "at this load")
    if cores <= 2:
        out.append(f"{cores} cores shared by gateway, simulators, broker and subscriber")
    return out


def _in_flight(cfg: BenchConfig, live: dict[str, object], *, seconds: float) -> float:
    """Buffer rows that are only in passage at the live rate: ``seconds`` of live messages, and at
    least two per device (in flight, or acknowledged and waiting for their delete)."""
    per_s = float(live.get("values_per_s") or 0) * float(live.get("mqtt_messages_per_value") or 0)  # type: ignore[arg-type]
    return max(2.0 * cfg.devices, seconds * per_s)


def _used_bytes(path: Path) -> int:
    """Bytes of the buffer database in use (pages not on the free list), read by a read-only reader."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            page_size, pages, free = (db.execute(f"PRAGMA {p}").fetchone()[0]
                                      for p in ("page_size", "page_count", "freelist_count"))
    except sqlite3.Error:
        return 0
    return int(page_size * (pages - free))


def _rates(a: Sample, b: Sample) -> dict[str, object]:
    dt = b.t - a.t
    values = b.values - a.values
    gw = b.gateway_cpu - a.gateway_cpu
    return {
        "seconds": round(dt, 2),
        "values": values,
        "values_per_s": round(values / dt),
        "values_polled_per_s": round((b.readings - a.readings) / dt),
        "gateway_cores": round(gw / dt, 2),
        "gateway_cpu_s_per_100k_values": round(gw / values * 100_000, 3) if values else None,
        "values_per_s_per_gateway_core": round(values / gw) if gw > 0 else None,
        "simulator_cores": round((b.sim_cpu - a.sim_cpu) / dt, 2),
        "buffer_rows_growth": round(b.rows - a.rows),
        "broker_cores": round((b.broker_cpu - a.broker_cpu) / dt, 2),
        "subscriber_cores": round((b.own_cpu - a.own_cpu) / dt, 2),
        "mqtt_messages_per_value": round((b.messages - a.messages) / values, 4) if values else None,
        "mqtt_bytes_per_value": round((b.payload_bytes - a.payload_bytes) / values, 1) if values else None,
    }


def _percentiles(sorted_values: list[float]) -> dict[str, float | None]:
    if not sorted_values:
        return {"p50": None, "p99": None, "max": None}

    def at(q: float) -> float:
        return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))] * 1000, 1)

    return {"p50": at(0.50), "p99": at(0.99), "max": round(sorted_values[-1] * 1000, 1)}


def _machine() -> dict[str, object]:
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    return {"cpus": os.cpu_count(), "cpu": model, "python": sys.version.split()[0]}


# -- output ----------------------------------------------------------------------------------------
def table(report: Report) -> str:
    c, live, drain = report.config, report.live, report.drain
    lat = live.get("latency_ms", {})
    rows: list[tuple[str, object]] = [
        ("tags (devices x tags)", f"{c['total_tags']} ({c['devices']} x {c['tags']}, {c['opcua']} OPC-UA)"),
        ("poll interval / event loop", f"{c['interval']} s / {c['loop']}"),
        ("values delivered /s", live.get("values_per_s")),
        ("values polled /s", live.get("values_polled_per_s")),
        ("change -> delivery p50/p99/max ms", _triple(lat)),
        ("read -> delivery p50/p99/max ms", _triple(live.get("read_to_delivery_ms", {}))),
        ("gateway cores", live.get("gateway_cores")),
        ("gateway CPU s per 100k values", live.get("gateway_cpu_s_per_100k_values")),
        ("values /s per gateway core", live.get("values_per_s_per_gateway_core")),
        ("gateway peak RSS MB", live.get("gateway_peak_rss_mb")),
        ("MQTT messages / bytes per value",
         f"{live.get('mqtt_messages_per_value')} / {live.get('mqtt_bytes_per_value')}"),
        ("simulator / broker / subscriber cores",
         f"{live.get('simulator_cores')} / {live.get('broker_cores')} / {live.get('subscriber_cores')}"),
    ]
    if drain:
        rows += [
            ("outage: backlog rows / values", f"{drain['backlog_rows']} / {drain['backlog_values']}"),
            ("SQLite bytes per value", drain["sqlite_bytes_per_value"]),
            ("drain s / values/s / x live", f"{drain['drain_s']} / {drain['values_per_s']} / {drain['ratio_to_live']}"
                                            + ("" if drain.get("drained", True) else " (not drained)")),
            ("subscriber has it all after s", drain["subscriber_caught_up_s"]),
            ("gateway cores while draining", drain["gateway_cores"]),
        ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    d = report.delivery
    lines.append(f"{'delivery check':<{width}}  {d.get('messages')} messages, {d.get('missing')} missing, "
                 f"{d.get('duplicates')} duplicates")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _triple(lat: object) -> str:
    d = lat if isinstance(lat, dict) else {}
    return " / ".join(str(d.get(k)) for k in ("p50", "p99", "max"))


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix="edge-gateway-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def bench(cfg: BenchConfig, *, workdir: Path | None = None) -> Report:
    with _workdir(workdir) as path:
        b = Bench(cfg, path)
        try:
            return await b.run()
        finally:
            b.stop()


def run_cli(cfg: BenchConfig, *, as_json: bool, workdir: Path | None) -> int:
    report = asyncio.run(bench(cfg, workdir=workdir))
    print(json.dumps(asdict(report), indent=2) if as_json else table(report))
    return 0
