"""Modbus TCP simulator of the plant's station PLCs (pymodbus server), with fault hooks.

Every station PLC runs the same program; its register map (``LAYOUT``) is the "PLC documentation"
that config/plant.yaml maps. The process model advances in fixed steps of ``STEP`` seconds of plant
time, computed lazily when a request arrives, so a run is deterministic for a given seed and number
of steps; ``time_scale`` makes plant time run faster than the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType as SimType
from pymodbus.simulator import SimData, SimDevice

from drivers.modbus.codec import RegisterFormat, set_bit
from drivers.modbus.types import DataType, Order, Table

STEP = 0.1  # seconds of plant time per model step
U32 = 1 << 32


class Kind(StrEnum):
    FILLING = "filling"
    LABELING = "labeling"
    CAPPING = "capping"
    PACKAGING = "packaging"
    POWDER = "powder"  # powder/soap line


NOMINAL_RATE = {  # target units per hour
    Kind.FILLING: 1200,
    Kind.LABELING: 1500,
    Kind.CAPPING: 1400,
    Kind.PACKAGING: 600,
    Kind.POWDER: 800,
}
STATUS = {"idle": 0, "running": 1, "paused": 2, "maintenance": 3, "error": 4}


@dataclass(frozen=True)
class Field:
    name: str
    table: Table
    address: int
    fmt: RegisterFormat
    scale: float = 1.0  # engineering value = raw * scale


def _f(name: str, table: Table, address: int, type_: DataType, *, count: int | None = None,
       bo: Order = Order.BIG, wo: Order = Order.BIG, bit: int | None = None, scale: float = 1.0) -> Field:
    fmt = RegisterFormat(type_, count or type_.width or 1, bo, wo, bit)
    return Field(name, table, address, fmt, scale)


H, I, C, D = Table.HOLDING, Table.INPUT, Table.COIL, Table.DISCRETE
LAYOUT: tuple[Field, ...] = (
    _f("status", H, 0, DataType.UINT16),
    _f("error_count", H, 1, DataType.UINT16),
    _f("units_total", H, 2, DataType.UINT32),
    _f("units_per_hour", H, 4, DataType.FLOAT32, wo=Order.LITTLE),
    _f("target_units_per_hour", H, 6, DataType.UINT16),
    _f("speed_setpoint", H, 7, DataType.INT16, scale=0.1),
    _f("running", H, 8, DataType.BOOL, bit=0),
    _f("fault", H, 8, DataType.BOOL, bit=1),
    _f("door_open", H, 8, DataType.BOOL, bit=10),
    _f("motor_temperature", H, 9, DataType.INT16, scale=0.1),
    _f("fill_volume", H, 10, DataType.FLOAT32),
    _f("cycle_time", H, 12, DataType.INT32, wo=Order.LITTLE),
    _f("energy_total", H, 14, DataType.UINT64),
    _f("runtime_total", H, 18, DataType.INT64, wo=Order.LITTLE),
    _f("volume_total", H, 22, DataType.FLOAT64, bo=Order.LITTLE, wo=Order.LITTLE),
    _f("product_code", H, 26, DataType.STRING, count=8),
    _f("batch_number", H, 34, DataType.UINT32, bo=Order.LITTLE),
    _f("ambient_temperature", I, 0, DataType.INT16, scale=0.1),
    _f("supply_voltage", I, 1, DataType.UINT16, scale=0.1),
    _f("conveyor_enabled", C, 0, DataType.BOOL),
    _f("guard_closed", D, 0, DataType.BOOL),
    _f("estop_ok", D, 1, DataType.BOOL),
)
REGISTERS = 64  # registers per table the PLC answers for (0..63); beyond: exception 2
BITS = 32
# Fields an HMI (or the gateway) may write: the PLC program takes them as its own state. Every other
# field is an output of the program, which re-asserts it before answering the next request (a write
# to it is accepted on the wire and does not stay). Registers and bits outside LAYOUT are plain memory.
WRITABLE = frozenset({"status", "target_units_per_hour", "speed_setpoint", "conveyor_enabled", "product_code",
                      "batch_number"})
SPEED_LIMITS = (0.0, 120.0)  # % of nominal: the program clamps a speed setpoint into this range
_WRITE_FC = {5: Table.COIL, 15: Table.COIL, 6: Table.HOLDING, 16: Table.HOLDING, 22: Table.HOLDING,
             23: Table.HOLDING}


@dataclass
class Faults:
    """Knobs the tests turn. Each applies to every request until it is reset."""

    delay: float = 0.0  # seconds before answering
    exception: int | None = None  # answer with this Modbus exception code
    hang: bool = False  # accept requests and never answer
    mangle: Callable[[bytes], bytes] | None = None  # rewrite each reply frame (MBAP + PDU) on the wire
    values: dict[str, object] = field(default_factory=dict)  # LAYOUT field -> value the PLC holds instead

    def clear(self) -> None:
        self.delay, self.exception, self.hang, self.mangle = 0.0, None, False, None
        self.values = {}


@dataclass
class StationModel:
    """The process: a line that runs, pauses, fails and counts units. Pure and deterministic."""

    kind: Kind
    seed: int = 0
    units_start: int = 0
    rng: random.Random = field(init=False)
    status: str = "running"
    units: float = 0.0
    rate: float = 0.0
    errors: int = 0
    energy: int = 0
    runtime: float = 0.0
    steps: int = 0
    hold: int = 0  # steps left in a pause or error
    fill: float = 500.0
    manual: bool = False  # status set by a write: held until the next status write
    speed: float = 100.0  # speed setpoint, % of nominal
    conveyor: bool | None = None  # written conveyor command; None: the conveyor runs with the line

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.units = float(self.units_start)
        self.target = NOMINAL_RATE[self.kind]
        self.batch = 240000 + self.rng.randrange(1000)
        self.product = f"NINU-{self.kind[:3].upper()}-500"

    def step(self) -> None:
        self.steps += 1
        r = self.rng.random()
        self.fill = 500.0 + self.rng.gauss(0, 0.8)
        if self.status == "running":
            self.rate = self.target * (0.9 + 0.12 * self.rng.random())
            if self.speed != 100.0:
                self.rate *= self.speed / 100.0
            self.units += self.rate * STEP / 3600
            self.runtime += STEP
            self.energy += 1 + int(self.rng.random() * 3)
            if r < 0.0005:
                self.status, self.hold, self.errors = "error", 50, (self.errors + 1) % 65536
            elif r < 0.002:
                self.status, self.hold = "paused", 30
        else:
            self.rate = 0.0
            if not self.manual:
                self.hold -= 1
                if self.hold <= 0:
                    self.status = "running"

    def command(self, name: str, value: object) -> None:
        """Take a value an HMI wrote to the WRITABLE field ``name`` (engineering units).

        Raises ValueError for a value the program does not accept (the PLC answers exception 3).
        """
        if name == "status":
            names = {code: s for s, code in STATUS.items()}
            if not isinstance(value, int) or value not in names:
                raise ValueError(f"no status {value!r}")
            self.status, self.hold = names[value], 0
            self.manual = self.status != "running"
            if self.manual:
                self.rate = 0.0
        elif name == "target_units_per_hour":
            self.target = int(value)  # type: ignore[call-overload]
        elif name == "speed_setpoint":
            low, high = SPEED_LIMITS
            self.speed = min(max(round(float(value), 1), low), high)  # type: ignore[arg-type]
        elif name == "conveyor_enabled":
            self.conveyor = bool(value)
        elif name == "product_code":
            self.product = str(value)
        elif name == "batch_number":
            self.batch = int(value)  # type: ignore[call-overload]
        else:
            raise ValueError(f"{name} is not writable")

    def values(self) -> dict[str, object]:
        """Engineering values of every LAYOUT field (what an operator reads on the HMI)."""
        t = self.steps * STEP
        running = self.status == "running"
        return {
            "status": STATUS[self.status],
            "error_count": self.errors,
            "units_total": int(self.units) % U32,
            "units_per_hour": _f32(self.rate),
            "target_units_per_hour": self.target,
            "speed_setpoint": self.speed,
            "running": running,
            "fault": self.status == "error",
            "door_open": self.status == "maintenance",
            "motor_temperature": round(35 + 8 * math.sin(t / 60) + (5 if running else 0), 1),
            "fill_volume": _f32(self.fill),
            "cycle_time": int(3_600_000 / self.rate) if self.rate else 0,
            "energy_total": self.energy,
            "runtime_total": int(self.runtime),
            "volume_total": int(self.units) * 0.5,
            "product_code": self.product,
            "batch_number": self.batch,
            "ambient_temperature": round(22 + 2 * math.sin(t / 600), 1),
            "supply_voltage": 230.0 + (self.steps % 7) / 10,
            "conveyor_enabled": running if self.conveyor is None else self.conveyor,
            "guard_closed": True,
            "estop_ok": True,
        }


def _f32(x: float) -> float:
    return float(struct.unpack(">f", struct.pack(">f", x))[0])


class Station:
    """One station PLC: a pymodbus TCP server on its own port, unit 1."""

    def __init__(self, station_id: str, kind: Kind, *, host: str = "127.0.0.1", port: int = 0,
                 unit: int = 1, seed: int = 0, units_start: int = 0, time_scale: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.id = station_id
        self.kind = kind
        self.host, self.port, self.unit = host, port, unit
        self.model = StationModel(kind, seed, units_start)
        self.faults = Faults()
        self.frozen = False
        self._clock = clock
        self._scale = time_scale
        self._t0 = 0.0
        self._server: ModbusTcpServer | None = None
        self._blocks: dict[str, list[int]] = {}
        self._snapshot: dict[str, object] = {}
        self._overrides: dict[str, object] = {}  # faults.values as last written to the registers
        self.requests = 0
        self.writes = 0  # write requests the PLC received
        self._written = False  # a client wrote: the program re-asserts its outputs before the next answer

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        device = SimDevice(
            id=self.unit,
            simdata=(
                [SimData(0, count=BITS, values=False, datatype=SimType.BITS)],
                [SimData(0, count=BITS, values=False, datatype=SimType.BITS)],
                [SimData(0, count=REGISTERS, values=0, datatype=SimType.REGISTERS)],
                [SimData(0, count=REGISTERS, values=0, datatype=SimType.REGISTERS)],
            ),
            action=self._on_request,
        )
        self._server = ModbusTcpServer(device, address=(self.host, self.port), trace_packet=self._on_packet)
        await self._server.serve_forever(background=True)
        self.port = self._server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        runtime = self._server.context.devices[self.unit]  # type: ignore[union-attr]
        self._blocks = {k: runtime.block[k][2] for k in ("c", "d", "h", "i")}
        self._t0 = self._clock()
        self._write(self.model.values())

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()  # type: ignore[no-untyped-call]
            self._server = None

    def drop_connections(self) -> None:
        """Close every client connection (the PLC's TCP stack resets)."""
        if self._server is not None:
            for conn in list(self._server.active_connections.values()):
                conn.close()

    # -- values ------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Stop the process model so the registers hold still (for exact comparisons)."""
        self._advance()
        self.frozen = True

    def snapshot(self) -> dict[str, object]:
        """The engineering values the registers hold right now."""
        return dict(self._snapshot)

    def _advance(self) -> None:
        if self._written:
            self._written = False
            self._write(self.model.values())
        if self.frozen:
            return
        due = int((self._clock() - self._t0) * self._scale / STEP)
        if due > self.model.steps:
            for _ in range(min(due - self.model.steps, 100_000)):
                self.model.step()
            self.model.steps = max(self.model.steps, due)
            self._write(self.model.values())

    def _write(self, values: dict[str, object]) -> None:
        self._overrides = dict(self.faults.values)
        values = {**values, **self._overrides}  # e.g. a float register holding NaN (a broken sensor)
        blocks = self._blocks
        for f in LAYOUT:
            value = values[f.name]
            if f.table.is_bits:
                block = blocks["c" if f.table is Table.COIL else "d"]
                reg, bit = divmod(f.address, 16)
                block[reg] = set_bit(block[reg], bit, bool(value))
                continue
            block = blocks["h" if f.table is Table.HOLDING else "i"]
            if f.fmt.bit is not None:
                block[f.address] = set_bit(block[f.address], f.fmt.bit, bool(value), f.fmt.byte_order)
                continue
            raw = round(value / f.scale) if f.scale != 1.0 else value  # type: ignore[operator]
            regs = f.fmt.encode(raw)
            block[f.address : f.address + len(regs)] = regs
        self._snapshot = values

    def _on_packet(self, sending: bool, data: bytes) -> bytes:
        mangle = self.faults.mangle
        return mangle(data) if sending and mangle is not None else data

    async def _on_request(self, _fc: int, _start: int, _address: int, _count: int,
                          _registers: list[int], _values: object) -> ExcCodes | None:
        if _values is None and _fc in _WRITE_FC:  # pymodbus reads a written register back for its reply
            return None
        self.requests += 1
        faults = self.faults
        if faults.hang:
            while self.faults.hang:
                await asyncio.sleep(0.05)
        if faults.delay:
            await asyncio.sleep(faults.delay)
        if faults.exception is not None:
            return ExcCodes(faults.exception)
        self._advance()
        table = _WRITE_FC.get(_fc)
        if table is not None and _values is not None:
            refused = self._take_write(table, _address, list(_values))  # type: ignore[call-overload]
            if refused is not None:
                return refused
        if self.faults.values != self._overrides:  # set or cleared since the registers were written
            self._write(self.model.values())
        return None


    def _take_write(self, table: Table, address: int, values: list[int] | list[bool]) -> ExcCodes | None:
        """A client writes ``values`` from ``address`` (pymodbus stores them after this returns).

        WRITABLE fields the write covers become the model's state; a value the program does not
        accept refuses the whole write with exception 3 (illegal data value) and changes nothing.
        """
        self.writes += 1
        end = address + len(values)
        taken: dict[str, object] = {}
        if table is Table.COIL:
            taken = {f.name: bool(values[f.address - address]) for f in LAYOUT
                     if f.table is Table.COIL and f.name in WRITABLE and address <= f.address < end}
        else:
            image = list(self._blocks["h"])
            image[address:end] = [int(v) for v in values]
            for f in LAYOUT:
                covered = f.address < end and address < f.address + f.fmt.count
                if f.table is not Table.HOLDING or f.name not in WRITABLE or not covered:
                    continue
                try:
                    raw = f.fmt.decode(image[f.address : f.address + f.fmt.count])
                except (UnicodeDecodeError, ValueError):
                    return ExcCodes.ILLEGAL_VALUE
                taken[f.name] = raw * f.scale if f.scale != 1.0 else raw  # type: ignore[operator]
        if "status" in taken and taken["status"] not in STATUS.values():
            return ExcCodes.ILLEGAL_VALUE
        for name, value in taken.items():
            self.model.command(name, value)
        self._written = True
        return None


def plant_stations(*, base_port: int = 5020, host: str = "127.0.0.1", seed: int = 1,
                   time_scale: float = 1.0) -> list[Station]:
    """The five stations of the plant, as config/plant.yaml expects them (ports 5020..5024)."""
    kinds = [(f"{k.value}-1", k) for k in Kind]
    return [
        Station(sid, kind, host=host, port=base_port + i if base_port else 0, seed=seed + i,
                units_start=U32 - 5000 if kind is Kind.FILLING else 1000 * i, time_scale=time_scale)
        for i, (sid, kind) in enumerate(kinds)
    ]


async def serve(stations: list[Station]) -> None:
    """Run until cancelled."""
    for s in stations:
        await s.start()
    try:
        await asyncio.Event().wait()
    finally:
        for s in stations:
            with contextlib.suppress(Exception):
                await s.stop()
