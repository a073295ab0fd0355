"""Test helpers: real broker subscribers, a gateway run in-process, waiting for conditions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import jsonschema
from prometheus_client import Counter
from referencing import Registry, Resource

from gateway.app import Gateway
from gateway.settings import Settings
from gateway.tagmap import TagMap

SCHEMAS = Path(__file__).resolve().parents[1] / "gateway" / "schemas"


def schema(name: str) -> dict[str, object]:
    return json.loads((SCHEMAS / f"{name}.json").read_text())


def _registry() -> Registry:
    resources = [(s["$id"], Resource.from_contents(s)) for s in (schema(p.stem) for p in SCHEMAS.glob("*.json"))]
    return Registry().with_resources(resources)


def validate(name: str, payload: object) -> None:
    """Check a real message against its schema (schemas may refer to each other)."""
    jsonschema.Draft202012Validator(schema(name), registry=_registry()).validate(payload)


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(step)


@dataclass
class Message:
    topic: str
    data: dict[str, object]
    retain: bool
    received: float


@dataclass
class Collector:
    """A subscriber on the real broker that keeps every message; reconnects on its own.

    With ``persistent=True`` it uses a fixed client id and a persistent session, so a broker with
    persistence keeps queueing QoS 1 messages for it while it is disconnected.
    """

    port: int
    topic: str
    persistent: bool = False
    messages: list[Message] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    identifier: str = field(default_factory=lambda: f"collector-{time.monotonic_ns()}")
    tls_context: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    last_error: str | None = None

    async def run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", self.port, identifier=self.identifier,
                    clean_session=not self.persistent, keepalive=5,
                    tls_context=self.tls_context, username=self.username, password=self.password,
                ) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.connected.set()
                    async for msg in client.messages:
                        assert isinstance(msg.payload, bytes)
                        try:
                            data = json.loads(msg.payload)
                        except ValueError:  # not ours to judge (a test may send garbage on purpose)
                            data = {"_raw": msg.payload.decode(errors="replace")}
                        self.messages.append(Message(str(msg.topic), data, bool(msg.retain), time.time()))
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
                self.connected.clear()
                await asyncio.sleep(0.1)

    def leaf(self, leaf: str) -> list[Message]:
        return [m for m in self.messages if m.topic.endswith("/" + leaf)]


@contextlib.asynccontextmanager
async def collecting(port: int, topic: str, *, persistent: bool = False, tls_context: ssl.SSLContext | None = None,
                     username: str | None = None, password: str | None = None) -> AsyncIterator[Collector]:
    collector = Collector(port, topic, persistent, tls_context=tls_context, username=username, password=password)
    task = asyncio.create_task(collector.run())
    try:
        try:
            async with asyncio.timeout(10):
                await collector.connected.wait()
        except TimeoutError:
            raise TimeoutError(f"the collector did not connect in 10 s: {collector.last_error}") from None
        yield collector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def running(tag_map: TagMap, buffer: Path, **kwargs: Any) -> AsyncIterator[Gateway]:
    gateway = Gateway(tag_map, Settings(http_address="127.0.0.1:0"), buffer_path=buffer, **kwargs)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        async with asyncio.timeout(10):
            await gateway.ready.wait()
        yield gateway
    finally:
        stop.set()
        done, _ = await asyncio.wait([task], timeout=15)
        if not done:  # say where it is stuck, then fail
            for t in asyncio.all_tasks():
                t.print_stack(limit=8)
            task.cancel()
            raise AssertionError("the gateway did not stop within 15 s")
        task.result()


def tune(tag_map: TagMap, *, interval: float | None = None, timeout: float | None = None,
         reconnect_max: float | None = None) -> TagMap:
    """A copy of ``tag_map`` with faster polling / shorter timeouts for tests."""
    dev_update = {k: v for k, v in (("interval", interval), ("timeout", timeout)) if v is not None}
    update: dict[str, object] = {"devices": [d.model_copy(update=dev_update) for d in tag_map.devices]}
    if reconnect_max is not None:
        update["mqtt"] = tag_map.mqtt.model_copy(update={"reconnect_max": reconnect_max})
    return tag_map.model_copy(update=update)


PLANT = Path(__file__).resolve().parents[1] / "config" / "plant.yaml"
STATION_DEVICES = ["filling-1-plc", "labeling-1-plc", "capping-1-plc", "packaging-1-plc", "powder-1-plc"]


def plant_file(tmp_path: Path, *, mqtt_port: int, stations: dict[str, Any], reactors_endpoint: str | None = None,
               interval: str = "1s") -> Path:
    """config/plant.yaml as a file, pointed at the test broker and simulators, for a gateway subprocess.

    Without ``reactors_endpoint`` the reactors (their OPC-UA device and assets) are left out.
    """
    text = PLANT.read_text().replace("port: 1883", f"port: {mqtt_port}")
    for i, dev in enumerate(STATION_DEVICES):
        text = text.replace(f"port: {5020 + i}, unit: 1, interval: 1s",
                            f"port: {stations[dev].port}, unit: 1, interval: {interval}")
    if reactors_endpoint is not None:
        text = text.replace("opc.tcp://127.0.0.1:4840/reactors", reactors_endpoint)
    else:
        head, _, rest = text.partition("  - id: reactors-plc\n")
        text = head + rest[rest.index("  - {id: filling-1-plc"):]
        assets_at = text.index("assets:\n")
        text = text[:assets_at] + "assets:\n" + text[text.index("  - {id: filling-1,"):]
    path = tmp_path / "plant.yaml"
    path.write_text(text)
    return path


def total(counter: Counter, **labels: str | tuple[str, ...]) -> float:
    """Sum of a counter's samples whose labels match (a tuple: any of its values)."""
    def match(have: dict[str, str]) -> bool:
        return all(have.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in labels.items())
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total") and match(s.labels))


def check_delivery(messages: list[Message], first: int, last: int) -> tuple[int, int]:
    """Every seq in first..last arrived, first occurrences in order per asset; (unique, duplicates)
    within first..last. ``messages``: those that carry a seq."""
    seqs = [int(m.data["seq"]) for m in messages]  # type: ignore[call-overload]
    got = {s for s in seqs if first <= s <= last}
    missing = sorted(set(range(first, last + 1)) - got)
    assert not missing, f"{len(missing)} seqs never arrived, e.g. {missing[:10]}"
    seen: set[int] = set()
    by_asset: dict[str, list[int]] = {}
    for m, s in zip(messages, seqs, strict=True):
        if s not in seen:
            seen.add(s)
            by_asset.setdefault(str(m.data["asset_id"]), []).append(s)
    for asset, order in by_asset.items():
        assert order == sorted(order), f"{asset}: first deliveries out of seq order"
    return len(got), sum(1 for s in seqs if first <= s <= last) - len(got)
