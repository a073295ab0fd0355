"""Modbus TCP driver: one connection per device, one request in flight at a time.

The wire is ``client.py`` over ``frame.py``: every reply is checked against its request
(transaction, protocol and unit id, function code, byte count, MBAP length) before a value is
used, and anything else drops the connection, so a late or stray frame never answers a later
request (PITFALLS.md). A timeout drops the connection too. SO_KEEPALIVE and TCP_USER_TIMEOUT catch
half-open sockets. The driver never reconnects by itself: the poller owns reconnecting.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Sequence
from functools import partial

from drivers import (
    BadReply,
    BadValue,
    DeviceException,
    DeviceTimeout,
    DeviceUnreachable,
    ReadResult,
    WriteNotApplied,
    WriteRefused,
)
from gateway.model import Quality, Reading

from .client import Closed, ModbusTcpClient, NoReply, Rejected
from .decode import CompiledRead, TagSpec, compile_reads
from .encode import encode_bit, encode_coil, encode_registers
from .frame import Reply, Request, read_request, write_request
from .planner import Limits, ReadRequest
from .types import Table

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


class ModbusTcpDriver:
    def __init__(self, *, device_id: str, host: str, port: int, timeout: float,
                 tags: Sequence[TagSpec], limits: Limits = Limits()) -> None:
        self.device_id = device_id
        self.host, self.port, self.timeout = host, port, timeout
        self.reads: list[CompiledRead] = compile_reads(tags, limits)
        self._client: ModbusTcpClient | None = None
        self._specs = {(t.asset, t.tag): t for t in tags}  # what write() needs of each tag
        self._io = asyncio.Lock()  # one request in flight per connection: reads and writes alike
        self._writing = asyncio.Lock()  # a write's read, write and read-back are not interleaved with another

    def describe_plan(self) -> list[str]:
        return [str(r.request) for r in self.reads]

    async def connect(self) -> None:
        self._drop()
        client = ModbusTcpClient(self.host, self.port, timeout=self.timeout)
        try:
            await client.connect()
        except Closed as exc:
            raise DeviceUnreachable(self.device_id, f"cannot connect to {self.host}:{self.port}: {exc}") from None
        self._client = client

    async def close(self) -> None:
        self._drop()

    def bad(self, reason: str, ts: float) -> list[Reading]:
        return [r for read in self.reads for r in read.bad(reason, ts)]

    async def read(self) -> ReadResult:
        result = ReadResult()
        for read in self.reads:
            req = read.request
            reply = await self._exchange(str(req), partial(
                read_request, unit=req.unit, fc=req.table.function_code, address=req.address, count=req.count))
            ts = time.time()
            if reply.exception is not None:
                err = _refused(self.device_id, reply.exception, str(req))
                result.errors.append(err)
                result.extend(read.bad(err.detail, ts))
            elif req.table.is_bits:
                result.extend(read.decode_bits(reply.bits, ts))
            else:
                readings = read.decode_registers(reply.registers, ts)
                if rejected := [r for r in readings if r.quality is Quality.BAD]:
                    result.errors.append(BadValue.of(self.device_id, rejected))
                result.extend(readings)
        return result

    async def _exchange(self, what: str, make: Callable[[int], Request]) -> Reply:
        """One request and its checked reply, or the DriverError that says why there is none.
        Any failure drops the connection (the client closes it): the next cycle reconnects."""
        client = self._client
        if client is None or not client.connected:
            self._drop()
            raise DeviceUnreachable(self.device_id, "not connected")
        async with self._io:
            try:
                return await client.request(make(client.next_tid()))
            except BaseException as exc:
                self._drop()  # whatever went wrong, the connection is not used again
                if isinstance(exc, NoReply):
                    raise DeviceTimeout(self.device_id, f"{exc} to {what}") from None
                if isinstance(exc, Rejected):
                    raise BadReply(self.device_id, f"{exc} in reply to {what}") from None
                if isinstance(exc, Closed):
                    raise DeviceUnreachable(self.device_id, f"{exc} during {what}") from None
                raise

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- writes ------------------------------------------------------------------------------
    async def write(self, asset: str, tag: str, value: object) -> object:
        """Set ``asset``/``tag`` to the engineering ``value``; return the value it held before.

        The tag is read, written (FC 5 for a coil, FC 6 for a one-register type, FC 16 for wider
        ones; a bool in a register rewrites that register with only its bit changed) and read back.
        Raises, before any request: WriteRefused for a tag this driver does not read or a read-only
        table, EncodeError for a value the tag cannot hold (both ValueError). Then, like read():
        DeviceUnreachable, DeviceTimeout (the write may or may not have been applied), BadReply,
        DeviceException for an exception reply (to the read or the write), and WriteNotApplied when
        the read-back differs from what was written. Requests share read()'s one-at-a-time lock.
        """
        spec = self._specs.get((asset, tag))
        if spec is None:
            raise WriteRefused(f"{self.device_id}: no tag {asset}/{tag} on this device")
        if spec.table not in (Table.HOLDING, Table.COIL):
            raise WriteRefused(f"{self.device_id}: {asset}/{tag} is in the {spec.table} table, "
                               "which Modbus cannot write (holding registers and coils only)")
        fmt = spec.fmt
        if spec.table is Table.COIL or fmt.bit is not None:
            bit, registers = encode_coil(value), None
        else:
            bit, registers = None, encode_registers(value, fmt, spec.transform)
        async with self._writing:
            before = await self._read_tag(spec)
            old = _engineering(spec, before)
            if spec.table is Table.COIL:
                assert bit is not None
                await self._write_request(spec, 5, [bit])
            elif bit is not None:
                await self._write_request(spec, 6, [encode_bit(bit, fmt, int(before[0]))])
            else:
                assert registers is not None
                await self._write_request(spec, 6 if len(registers) == 1 else 16, registers)
            after = await self._read_tag(spec)
        if spec.table is Table.COIL:
            taken = bool(after[0]) is bit
        elif bit is not None:
            taken = fmt.decode([int(after[0])]) is bit
        else:
            taken = [int(r) for r in after] == registers
        if not taken:
            raise WriteNotApplied(self.device_id, f"{asset}/{tag}: wrote {value!r}, the PLC holds "
                                                  f"{_engineering(spec, after)!r}")
        return old

    async def _read_tag(self, spec: TagSpec) -> list[int] | list[bool]:
        """The registers (or the one bit) of one tag, read on their own."""
        count = 1 if spec.table.is_bits else spec.fmt.count
        req = ReadRequest(spec.unit, spec.table, spec.address, count, ((spec.key, 0),))
        reply = await self._exchange(str(req), partial(read_request, unit=spec.unit, fc=spec.table.function_code,
                                                      address=spec.address, count=count))
        if reply.exception is not None:
            raise _refused(self.device_id, reply.exception, str(req))
        return list(reply.bits[:1]) if spec.table.is_bits else list(reply.registers)

    async def _write_request(self, spec: TagSpec, fc: int, values: list[int] | list[bool]) -> None:
        """FC 5, 6 or 16. The reply must echo the address (and FC 16's count): a reply to another
        request is caught by the frame check. The value FC 5/6 echo is not compared: some servers
        answer what they hold, and the read back is what says whether the value was taken."""
        what = f"write (FC {fc}) of unit {spec.unit} {spec.table} {spec.address}+{len(values)}"
        try:
            reply = await self._exchange(what, partial(write_request, unit=spec.unit, fc=fc, address=spec.address,
                                                       values=values))
        except DeviceTimeout as exc:
            raise DeviceTimeout(self.device_id, f"{exc.detail}; the PLC may or may not have applied it") from None
        if reply.exception is not None:
            raise _refused(self.device_id, reply.exception, what)


def _refused(device: str, code: int, what: str) -> DeviceException:
    return DeviceException(device, f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')}) for {what}")


def _engineering(spec: TagSpec, raw: Sequence[int] | Sequence[bool]) -> object:
    """The engineering value of one tag's own registers (None when they do not decode)."""
    if spec.table.is_bits:
        return bool(raw[0])
    try:
        value = spec.fmt.decode([int(r) for r in raw])
    except (struct.error, UnicodeDecodeError, ValueError):
        return None
    return spec.transform.apply(value)[0]
