"""PLC faults against the bundled simulators over real sockets, polled the way the gateway polls them.

For every fault: the faulty device's tags turn ``bad`` with a readable reason, ``gateway_device_errors``
counts it by device and kind, and a healthy station polled in the same event loop keeps its interval
(its cycle timestamps during the fault are compared with its configured interval, with a generous
tolerance: the point is that it never waits for the faulty device's timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from drivers import Driver
from drivers.modbus.driver import EXCEPTION_NAMES
from drivers.opcua import OpcTagSpec, OpcUaDriver
from drivers.registry import build_driver
from gateway.brokers import free_port
from gateway.demo import with_endpoints
from gateway.metrics import Metrics
from gateway.model import Quality, Reading
from gateway.poller import DeviceBatch, Poller
from gateway.tagmap import TagMap
from simulators.proxy import FaultProxy
from simulators.reactors import NAMESPACE
from simulators.stations import Kind, Station

from .helpers import wait_until

pytestmark = pytest.mark.integration

HEALTHY = "labeling-1-plc"  # a station that keeps working while another device fails
FAULTY = "filling-1-plc"
REACTORS = "reactors-plc"
INTERVAL = 0.1  # every device's poll interval
TIMEOUT = 0.5  # every device's request timeout
STALL = TIMEOUT  # the healthy station never waits as long as one timeout of the faulty device
MEAN_SLACK = 1.5  # its mean cycle may stretch by half under a loaded CPU, not more


class Rig:
    """Pollers of several devices in one event loop, as the gateway runs them; every batch timestamped."""

    def __init__(self, tag_map: TagMap) -> None:
        self.tag_map = tag_map
        self.metrics = Metrics()
        self.batches: dict[str, list[tuple[float, DeviceBatch]]] = defaultdict(list)
        self.pollers: dict[str, Poller] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def put(self, batch: DeviceBatch) -> None:  # the pollers' sink (the gateway's queue)
        self.batches[batch.device].append((time.monotonic(), batch))

    def start(self, driver: Driver) -> Poller:
        poller = Poller(driver=driver, interval=INTERVAL, timeout=TIMEOUT, requests=len(driver.describe_plan()),
                        out=self, metrics=self.metrics, backoff_cap=0.2)
        self.pollers[driver.device_id] = poller
        self._tasks.append(asyncio.create_task(poller.run(), name=f"poller[{driver.device_id}]"))
        return poller

    async def stop(self) -> None:
        for p in self.pollers.values():
            p.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def latest(self, device: str) -> dict[str, Reading]:
        """The newest reading of every tag of ``device`` (a subscription sends only changes)."""
        out: dict[str, Reading] = {}
        for _, batch in self.batches[device]:
            out.update({f"{r.asset}/{r.tag}": r for r in batch.readings})
        return out

    def errors(self, device: str, kind: str) -> float:
        value = self.metrics.registry.get_sample_value("gateway_device_errors_total", {"device": device, "kind": kind})
        return value or 0.0

    def cycles(self, device: str, since: float) -> list[float]:
        return [t for t, b in self.batches[device] if t >= since and b.connected]

    def keeps_interval(self, test: str, since: float, device: str = HEALTHY) -> None:
        """``device`` polled at its interval since ``since``, every reading good."""
        stamps = self.cycles(device, since)
        assert len(stamps) >= 5, f"{device}: only {len(stamps)} cycles since the fault"
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        mean, worst = (stamps[-1] - stamps[0]) / len(gaps), max(gaps)
        measured = f"{len(stamps)} cycles, mean {mean * 1000:.0f} ms, max {worst * 1000:.0f} ms"
        print(f"{test}: {device} (interval {INTERVAL * 1000:.0f} ms) during the fault: {measured}")
        assert mean < INTERVAL * MEAN_SLACK, f"{device} slowed down: {measured}"
        assert worst < STALL, f"{device} waited for the faulty device: {measured}"
        bad = [r for t, b in self.batches[device] if t >= since for r in b.readings if r.quality is not Quality.GOOD]
        assert not bad, bad[:3]
        assert self.errors(device, "timeout") == self.errors(device, "unreachable") == 0

    async def fault_seen(self, device: str, kind: str, reason: Callable[[str], bool] | str, *, since: float,
                         tags: set[str] | None = None) -> dict[str, Reading]:
        """Wait until ``tags`` (all of the device's) are bad with ``reason``, the fault was counted, and the
        healthy station had time for several cycles meanwhile. Returns the device's latest readings."""
        match = reason if callable(reason) else (lambda text: reason in text)

        def seen() -> bool:
            latest = self.latest(device)
            chosen = [r for k, r in latest.items() if tags is None or k in tags]
            return (bool(chosen) and all(r.quality is Quality.BAD and match(r.reason or "") for r in chosen)
                    and self.errors(device, kind) >= 1 and len(self.cycles(HEALTHY, since)) >= 8)

        await wait_until(seen, 10, f"{device}: tags bad ({reason}), a {kind} error counted")
        return self.latest(device)

    async def good(self, device: str, within: float = 10) -> None:
        def ok() -> bool:
            latest = self.latest(device)
            return bool(latest) and self.pollers[device].connected and all(
                r.quality is Quality.GOOD for r in latest.values())

        await wait_until(ok, within, f"{device}: every tag good")


@pytest.fixture
async def rig(plant_map: TagMap) -> AsyncIterator[Rig]:
    """A rig already polling the healthy station."""
    station = Station(HEALTHY, Kind.LABELING, seed=3)
    await station.start()
    r = Rig(plant_map)
    r.start(build_driver(with_endpoints(plant_map, stations={HEALTHY: station}), HEALTHY))
    try:
        await r.good(HEALTHY)
        yield r
    finally:
        await r.stop()
        await station.stop()


def modbus(tag_map: TagMap, port: int) -> Driver:
    devices = [d.model_copy(update={"host": "127.0.0.1", "port": port, "timeout": TIMEOUT}) if d.id == FAULTY else d
               for d in tag_map.devices]
    return build_driver(tag_map.model_copy(update={"devices": devices}), FAULTY)


REACTOR_TAGS = (("temperature", "Temperature"), ("pressure", "Pressure"), ("ph_level", "PhLevel"),
                ("batch_id", "BatchId"))


def opcua(endpoint: str, *, device: str = REACTORS, mode: str = "subscribe") -> OpcUaDriver:
    tags = [OpcTagSpec("reactor-a", tag, f"nsu={NAMESPACE};s=ReactorA.{var}",
                       expected="string" if tag == "batch_id" else "float") for tag, var in REACTOR_TAGS]
    return OpcUaDriver(device_id=device, endpoint=endpoint, mode=mode, interval=INTERVAL, timeout=TIMEOUT,
                       tags=tags)


class SilentServer:
    """Accepts connections and reads every byte, never answers (a PLC whose program hangs)."""

    def __init__(self) -> None:
        self.port = 0
        self.open = 0  # connections the client has not closed
        self._writers: set[asyncio.StreamWriter] = set()

    async def _swallow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.open += 1
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        self.open -= 1
        writer.close()


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[SilentServer]:
    silent = SilentServer()
    server = await asyncio.start_server(silent._swallow, "127.0.0.1", 0)
    silent.port = server.sockets[0].getsockname()[1]
    try:
        yield silent
    finally:
        server.close()
        for w in silent._writers:
            w.close()
        await server.wait_closed()


REACTOR_PLC = """
import asyncio, json, sys
from simulators.reactors import ReactorServer

async def main():
    server = ReactorServer(port=int(sys.argv[1]), letters="A", time_scale=5.0)
    await server.start()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):  # {"Temperature": "nan", ...}
        server.models["A"].faults.values = {k: float(v) for k, v in json.loads(line).items()}

asyncio.run(main())
"""


class ReactorPlc:
    """The reactor simulator in a process of its own, as a PLC is another machine (asyncua builds a
    server's address space synchronously: in the pollers' process that would stall them)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"opc.tcp://127.0.0.1:{self.port}/reactors"
        self._proc = self._spawn()
        self._ready()

    def _spawn(self) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-c", REACTOR_PLC, str(self.port)], cwd=Path(__file__).parents[1],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _ready(self) -> None:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        assert line == "ready\n", f"the reactor simulator did not start (exit code {self._proc.poll()})"

    def set_values(self, **values: float) -> None:
        """Variables of reactor A published with these values instead (Good status); none: the model's."""
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({k: str(v) for k, v in values.items()}) + "\n")
        self._proc.stdin.flush()

    async def restart(self, downtime: float) -> None:
        """The PLC reboots: its process ends (the kernel closes its sockets), a new one starts on the port."""
        await asyncio.to_thread(self.close)
        await asyncio.sleep(downtime)
        self._proc = self._spawn()
        await asyncio.to_thread(self._ready)

    def close(self) -> None:
        self._proc.terminate()
        self._proc.wait(timeout=10)
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture(scope="module")
def reactors() -> Iterator[ReactorPlc]:
    plc = ReactorPlc()
    try:
        yield plc
    finally:
        plc.close()


# -- device does not answer --------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", ["modbus", "opcua"])
async def test_connection_refused(rig: Rig, protocol: str) -> None:
    port = free_port()  # nothing listens there
    since = time.monotonic()
    if protocol == "modbus":
        rig.start(modbus(rig.tag_map, port))
        device, reason = FAULTY, f"unreachable: {FAULTY}: cannot connect to 127.0.0.1:{port}"
    else:
        endpoint = f"opc.tcp://127.0.0.1:{port}/reactors"
        rig.start(opcua(endpoint))
        device, reason = REACTORS, f"unreachable: {REACTORS}: cannot connect to {endpoint}"
    latest = await rig.fault_seen(device, "unreachable", reason, since=since)
    assert len(latest) == (22 if protocol == "modbus" else 4)
    rig.keeps_interval(f"connection refused ({protocol})", since)


@pytest.mark.parametrize("protocol", ["modbus", "opcua"])
async def test_server_that_accepts_and_never_answers(rig: Rig, protocol: str) -> None:
    async with silent_server() as silent:
        port = silent.port
        since = time.monotonic()
        if protocol == "modbus":
            rig.start(modbus(rig.tag_map, port))
            device, reason = FAULTY, f"timeout: {FAULTY}: no reply in {TIMEOUT:g}s to unit 1 coil 0+1"
        else:
            endpoint = f"opc.tcp://127.0.0.1:{port}/reactors"
            rig.start(opcua(endpoint))
            device, reason = REACTORS, f"timeout: {REACTORS}: no session with {endpoint}"
        await rig.fault_seen(device, "timeout", reason, since=since)
        await wait_until(lambda: rig.errors(device, "timeout") >= 2, 10, "a second timeout")  # after a reconnect
        assert rig.errors(device, "unreachable") == 0
        rig.keeps_interval(f"accepts, never answers ({protocol})", since)


async def test_cancelled_opcua_connect_leaves_no_socket_open() -> None:
    """A connect cut short (the poller's safety net, a shutdown) must close the half-open session's socket:
    asyncua closes it on errors, not on a cancellation, and the driver holds no client to close yet."""
    async with silent_server() as silent:
        connect = asyncio.create_task(opcua(f"opc.tcp://127.0.0.1:{silent.port}/reactors").connect())
        await wait_until(lambda: silent.open == 1, 5, "the connection")
        connect.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connect
        await wait_until(lambda: silent.open == 0, 5, "the socket closed by the client")


async def test_station_that_stops_answering(station: Station, rig: Rig) -> None:
    rig.start(modbus(rig.tag_map, station.port))
    await rig.good(FAULTY)
    since = time.monotonic()
    station.faults.hang = True
    await rig.fault_seen(FAULTY, "timeout", f"timeout: {FAULTY}: no reply in {TIMEOUT:g}s", since=since)
    await wait_until(lambda: rig.errors(FAULTY, "timeout") >= 2, 10, "a second timeout")
    rig.keeps_interval("answered, then hangs (modbus)", since)
    station.faults.clear()
    await rig.good(FAULTY)


@pytest.mark.parametrize(("delay", "good"), [(0.1, True), (0.8, False)], ids=["within-timeout", "beyond-timeout"])
async def test_slow_replies(station: Station, rig: Rig, delay: float, good: bool) -> None:
    rig.start(modbus(rig.tag_map, station.port))
    await rig.good(FAULTY)
    polls = rig.metrics.polls.labels(FAULTY)
    station.faults.delay = delay  # before every reply, for each of the cycle's 4 requests
    since = time.monotonic()
    if good:
        done = polls._value.get()
        await wait_until(lambda: polls._value.get() >= done + 2 and len(rig.cycles(HEALTHY, since)) >= 8, 10,
                         "two slow cycles")
        slow = [r for t, b in rig.batches[FAULTY] if t > since for r in b.readings]
        assert slow and all(r.quality is Quality.GOOD for r in slow)
        assert not any(rig.errors(FAULTY, kind) for kind in ("timeout", "unreachable", "bad_reply"))
        rig.keeps_interval("slow replies within the timeout", since)
        return
    await rig.fault_seen(FAULTY, "timeout", f"timeout: {FAULTY}: no reply in {TIMEOUT:g}s", since=since)
    rig.keeps_interval("replies slower than the timeout", since)
    station.faults.clear()
    await rig.good(FAULTY)


# -- device answers, but not with values --------------------------------------------------------------

async def test_exception_codes(station: Station, rig: Rig) -> None:
    rig.start(modbus(rig.tag_map, station.port))
    await rig.good(FAULTY)
    since = time.monotonic()
    for code in (1, 2, 3, 4, 6, 10, 11):
        before = rig.errors(FAULTY, "exception")
        station.faults.exception = code
        text = f"exception {code} ({EXCEPTION_NAMES[code]}) for unit 1 "
        await rig.fault_seen(FAULTY, "exception", text, since=since)
        assert rig.errors(FAULTY, "exception") > before
    assert rig.pollers[FAULTY].connected, "an exception reply is a reply: the connection stays"
    assert rig.errors(FAULTY, "timeout") == rig.errors(FAULTY, "unreachable") == 0
    rig.keeps_interval("Modbus exception codes", since)
    station.faults.clear()
    await rig.good(FAULTY)


def _fc3_as_fc4(frame: bytes) -> bytes:
    return frame[:7] + bytes([4]) + frame[8:] if frame[7] == 3 else frame


def _one_register_short(frame: bytes) -> bytes:
    """A well-formed FC 3 reply with one register less than asked for."""
    if frame[7] != 3:
        return frame
    pdu = bytes([3, frame[8] - 2]) + frame[9:-2]
    return frame[:4] + (1 + len(pdu)).to_bytes(2, "big") + frame[6:7] + pdu


def _byte_count_beyond_data(frame: bytes) -> bytes:
    return frame[:8] + bytes([frame[8] + 2]) + frame[9:] if frame[7] == 3 else frame


def _other_transaction(frame: bytes) -> bytes:
    return ((int.from_bytes(frame[:2], "big") + 1) % 65536).to_bytes(2, "big") + frame[2:]


def _other_unit(frame: bytes) -> bytes:
    return frame[:6] + bytes([frame[6] + 1]) + frame[7:]


def _shorter_than_its_header(frame: bytes) -> bytes:
    return frame[:-4] if frame[7] == 3 else frame


@pytest.mark.parametrize(("mangle", "reason"), [
    (_fc3_as_fc4, "function code 4 to a request with 3"),
    (_one_register_short, "byte count 70 instead of 72 (for 36 registers) in reply to unit 1 holding 0+36"),
    (_byte_count_beyond_data, "byte count 74 in a frame that holds 72 data bytes in reply to unit 1 holding 0+36"),
    (_other_transaction, re.compile(r"transaction id (\d+) instead of \d+ in reply to unit 1 coil 0\+1")),
    (_other_unit, "unit 2 instead of 1 in reply to unit 1 coil 0+1"),
    (_shorter_than_its_header, "77 of the 81 bytes its header announces in reply to unit 1 holding 0+36"),
], ids=["function-code", "register-count", "byte-count", "transaction-id", "unit-id", "truncated"])
async def test_reply_that_does_not_match_the_request(
    station: Station, rig: Rig, mangle: Callable[[bytes], bytes], reason: str | re.Pattern[str]
) -> None:
    rig.start(modbus(rig.tag_map, station.port))
    await rig.good(FAULTY)
    since = time.monotonic()
    station.faults.mangle = mangle
    pattern = reason if isinstance(reason, re.Pattern) else re.compile(re.escape(reason))
    await rig.fault_seen(FAULTY, "bad_reply", lambda text: bool(pattern.search(text)), since=since)
    assert rig.latest(FAULTY)["filling-1/status"].reason.startswith(f"bad_reply: {FAULTY}: ")  # type: ignore[union-attr]
    assert rig.errors(FAULTY, "timeout") == 0, "a reply that came is not reported as no reply"
    rig.keeps_interval(f"reply with wrong {mangle.__name__.strip('_')}", since)
    station.faults.clear()
    await rig.good(FAULTY)


async def test_modbus_float_registers_holding_nan_or_infinity(station: Station, rig: Rig) -> None:
    rig.start(modbus(rig.tag_map, station.port))
    await rig.good(FAULTY)
    since = time.monotonic()
    # float32 (word order little), float32, float64 (byte and word order little)
    station.faults.values = {"units_per_hour": math.inf, "fill_volume": math.nan, "volume_total": -math.inf}
    broken = {"filling-1/units_per_hour": "inf", "filling-1/fill_volume": "nan", "filling-1/volume_total": "-inf"}
    latest = await rig.fault_seen(FAULTY, "bad_value", "not a finite number", since=since, tags=set(broken))
    for key, shown in broken.items():
        assert latest[key].reason == f"not a finite number ({shown})" and latest[key].value is None, latest[key]
    others = [r for k, r in latest.items() if k not in broken]
    assert len(others) == 19 and all(r.quality is Quality.GOOD for r in others), "only the broken tags are bad"
    assert rig.pollers[FAULTY].connected
    rig.keeps_interval("Modbus NaN / infinite floats", since)
    station.faults.clear()
    await rig.good(FAULTY)


# -- OPC-UA ---------------------------------------------------------------------------------------------

async def test_opcua_values_nan_or_infinite(rig: Rig, reactors: ReactorPlc) -> None:
    """Both modes against one server: the subscription gets the value once, the poll every cycle."""
    rig.start(opcua(reactors.endpoint))
    rig.start(opcua(reactors.endpoint, device="reactors-poll", mode="poll"))
    await rig.good(REACTORS)
    await rig.good("reactors-poll")
    since = time.monotonic()
    reactors.set_values(Temperature=math.nan, Pressure=math.inf, PhLevel=-math.inf)
    broken = {"reactor-a/temperature": "nan", "reactor-a/pressure": "inf", "reactor-a/ph_level": "-inf"}
    try:
        for device in (REACTORS, "reactors-poll"):
            latest = await rig.fault_seen(device, "bad_value", "not a finite number", since=since, tags=set(broken))
            for key, shown in broken.items():
                assert latest[key].reason == f"not a finite number ({shown})", latest[key]
            assert latest["reactor-a/batch_id"].quality is Quality.GOOD
            assert rig.pollers[device].connected
        rig.keeps_interval("OPC-UA NaN / infinite values", since)
    finally:
        reactors.set_values()
    await rig.good(REACTORS)
    await rig.good("reactors-poll")


async def test_opcua_slow_then_silent_server(rig: Rig, reactors: ReactorPlc) -> None:
    proxy = FaultProxy("127.0.0.1", reactors.port)
    await proxy.start()
    try:
        rig.start(opcua(f"opc.tcp://127.0.0.1:{proxy.port}/reactors", mode="poll"))
        await rig.good(REACTORS)
        since = time.monotonic()
        proxy.delay = 0.1  # within the timeout: still good
        polls = rig.metrics.polls.labels(REACTORS)
        done = polls._value.get()
        await wait_until(lambda: polls._value.get() >= done + 3, 10, "three slow cycles")
        assert all(r.quality is Quality.GOOD for t, b in rig.batches[REACTORS] if t > since for r in b.readings)
        proxy.delay = 1.5  # beyond: a read waits at most 2 timeouts
        await rig.fault_seen(REACTORS, "timeout", f"timeout: {REACTORS}: no answer from", since=since)
        proxy.delay = 0.0
        proxy.cut()
        await rig.good(REACTORS)
        before = rig.errors(REACTORS, "timeout")
        proxy.hang = True  # the link stays up, nothing comes back
        await wait_until(lambda: rig.errors(REACTORS, "timeout") > before and not rig.pollers[REACTORS].connected,
                         10, "the silent server noticed")
        await rig.fault_seen(REACTORS, "timeout", f"timeout: {REACTORS}: ", since=since)
        rig.keeps_interval("OPC-UA slow, then silent server", since)
        proxy.hang = False
        proxy.cut()
        await rig.good(REACTORS)
    finally:
        await proxy.stop()


async def test_opcua_server_restart(rig: Rig, reactors: ReactorPlc) -> None:
    """test_opcua.py follows a restart to MQTT; here: the counter, and the station next to it."""
    devices = (REACTORS, "reactors-poll")
    rig.start(opcua(reactors.endpoint))
    rig.start(opcua(reactors.endpoint, device="reactors-poll", mode="poll"))
    for device in devices:
        await rig.good(device)
    since = time.monotonic()
    restart = asyncio.create_task(reactors.restart(downtime=0.5))
    try:
        for device in devices:
            latest = await rig.fault_seen(device, "unreachable", f"unreachable: {device}: ", since=since)
            print(f"{device} during the restart: {latest['reactor-a/temperature'].reason}")
    finally:
        await restart
    rig.keeps_interval("OPC-UA server restart", since)
    for device in devices:
        await rig.good(device, within=15)
