"""Devices for ``edge-gateway bench``: many Modbus TCP (and OPC-UA) PLCs with synthetic tags, in one process.

Every ``change`` seconds each device's values move and its ``changed_at`` tag (float64, seconds since
the epoch) is set to the moment they did, so a subscriber can measure change -> delivery latency.

The Modbus side is a small FC 3/4 server written for load, not pymodbus: a pymodbus server answers
~2,700 reads/s per process, which would make the simulator, not the gateway, the thing measured. It
answers frames one by one (several in one segment too), checks what it is asked and answers illegal
function / illegal data address like a PLC. The station simulators (``simulators.stations``) remain
the faithful pymodbus-based PLCs the tests use.

    python -m simulators.bench --modbus 4 --opcua 0 --tags 500 --change 0.1 --ports-file ports.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAMP_REGISTERS = 4  # changed_at: float64 at holding register 0
FLOAT_SHARE = 4  # every 4th value tag is a float32, the others int16 scaled by 0.1


@dataclass(frozen=True, slots=True)
class Layout:
    """The register map of a bench device with ``tags`` tags (changed_at included)."""

    tags: int

    def fields(self) -> list[tuple[str, str, int]]:
        """(name, type, address): changed_at first, then v0001..; int16 and float32 mixed."""
        out = [("changed_at", "float64", 0)]
        address = STAMP_REGISTERS
        for i in range(1, self.tags):
            kind = "float32" if i % FLOAT_SHARE == 0 else "int16"
            out.append((f"v{i:04d}", kind, address))
            address += 2 if kind == "float32" else 1
        return out

    @property
    def registers(self) -> int:
        return sum(2 if t == "float32" else 4 if t == "float64" else 1 for _, t, _ in self.fields())


def _value(i: int, step: int) -> int:
    """Raw value of tag ``i`` at change ``step``: moves every step, stays within int16 and a limit rule."""
    return (i * 37 + step * 7) % 900 + 50


class ModbusDevice:
    def __init__(self, layout: Layout, changing: float = 1.0) -> None:
        self.layout = layout
        fields = layout.fields()
        self.kinds = [kind for _, kind, _ in fields[1:]]
        self.struct = struct.Struct(">d" + "".join("f" if k == "float32" else "h" for k in self.kinds))
        self.moving = max(1, round(len(self.kinds) * changing))  # tags 1..moving move at each step
        self.image = b""
        self.step = 0
        self.requests = 0

    def update(self, now: float) -> None:
        """Move the values (one struct call for the whole register image) and stamp the change."""
        self.step += 1
        values: list[float] = [now]
        for n, kind in enumerate(self.kinds, start=1):
            raw = _value(n, self.step if n <= self.moving else 1)
            values.append(raw / 10 if kind == "float32" else raw)
        self.image = self.struct.pack(*values)

    def answer(self, frame: bytes) -> bytes:
        """One Modbus TCP request frame (MBAP + PDU) -> the reply frame."""
        tid, _, _, unit, fc = struct.unpack_from(">HHHBB", frame)
        self.requests += 1
        if fc not in (3, 4) or len(frame) < 12:
            return struct.pack(">HHHBBB", tid, 0, 3, unit, fc | 0x80, 1)
        start, count = struct.unpack_from(">HH", frame, 8)
        if not 1 <= count <= 125 or (start + count) * 2 > len(self.image):
            return struct.pack(">HHHBBB", tid, 0, 3, unit, fc | 0x80, 2)
        data = self.image[start * 2:(start + count) * 2]
        return struct.pack(">HHHBBB", tid, 0, 3 + len(data), unit, fc, len(data)) + data


class _ModbusProtocol(asyncio.Protocol):
    def __init__(self, device: ModbusDevice) -> None:
        self.device = device
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.pending + data
        while len(buf) >= 7:
            length = struct.unpack_from(">H", buf, 4)[0]
            end = 6 + length
            if length < 2 or length > 260:  # not Modbus: drop the connection, as a PLC would
                assert self.transport is not None
                self.transport.close()
                return
            if len(buf) < end:
                break
            assert self.transport is not None
            self.transport.write(self.device.answer(buf[:end]))
            buf = buf[end:]
        self.pending = buf


async def _opcua_device(tags: int, port: int, index: int) -> tuple[Any, list[Any]]:
    """An asyncua server with ``tags`` Double variables ns=2;s=Dev.changed_at, Dev.v0001, ..."""
    import logging

    from asyncua import Server, ua

    logging.getLogger("asyncua").setLevel(logging.ERROR)
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}/bench")
    ns = await server.register_namespace("urn:edge-gateway:bench")
    folder = await server.nodes.objects.add_object(ns, f"Dev{index}")
    nodes = []
    for i in range(tags):
        name = "changed_at" if i == 0 else f"v{i:04d}"
        nodes.append(await folder.add_variable(ua.NodeId(f"Dev.{name}", ns), name, 0.0, ua.VariantType.Double))
    await server.start()
    return server, nodes


async def serve(*, modbus: int, opcua: int, tags: int, change: float, changing: float,
                ports_file: Path, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    layout = Layout(tags)
    devices = [ModbusDevice(layout, changing) for _ in range(modbus)]
    now = time.time()
    for d in devices:
        d.update(now)
    servers = [await loop.create_server(lambda d=d: _ModbusProtocol(d), "127.0.0.1", 0) for d in devices]  # type: ignore[misc]
    ports: dict[str, list[int]] = {"modbus": [s.sockets[0].getsockname()[1] for s in servers], "opcua": []}
    ua_servers = []
    if opcua:
        from gateway.brokers import free_port

        for i in range(opcua):
            port = free_port()
            ua_servers.append(await _opcua_device(tags, port, i))
            ports["opcua"].append(port)
    tmp = ports_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(ports))
    tmp.replace(ports_file)  # the bench waits for this file: every server listens once it exists
    step = 0
    next_at = time.monotonic()
    try:
        while not stop.is_set():
            now = time.time()
            step += 1
            for d in devices:
                d.update(now)
            for server, nodes in ua_servers:
                moving = max(1, round((len(nodes) - 1) * changing))
                await server.write_attribute_value(nodes[0].nodeid, _variant(now))  # type: ignore[attr-defined]
                for n, node in enumerate(nodes[1:moving + 1], start=1):
                    await server.write_attribute_value(node.nodeid, _variant(_value(n, step) / 10))  # type: ignore[attr-defined]
            next_at += change
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
            if next_at < time.monotonic() - change:  # overloaded: skip, don't burst
                next_at = time.monotonic()
    finally:
        for s in servers:
            s.close()
        for server, _ in ua_servers:
            await server.stop()  # type: ignore[attr-defined]


def _variant(x: float) -> object:
    from asyncua import ua

    return ua.DataValue(ua.Variant(x, ua.VariantType.Double))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulators.bench", description=__doc__.splitlines()[0])
    p.add_argument("--modbus", type=int, default=1, help="Modbus TCP devices (one port each)")
    p.add_argument("--opcua", type=int, default=0, help="OPC-UA servers (one port each)")
    p.add_argument("--tags", type=int, default=100, help="tags per device, changed_at included")
    p.add_argument("--change", type=float, default=1.0, help="seconds between value changes")
    p.add_argument("--changing", type=float, default=1.0, help="share of tags that move at each change")
    p.add_argument("--ports-file", type=Path, required=True, help="written once every device listens")
    args = p.parse_args(argv)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(modbus=args.modbus, opcua=args.opcua, tags=args.tags, change=args.change,
                    changing=args.changing, ports_file=args.ports_file, stop=stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
