"""Modbus TCP driver on pymodbus: one connection per device, one request in flight at a time.

PITFALLS.md: pymodbus does not guard against a late reply being taken for the next request, so a
timeout drops the connection before anything else is sent; every reply's function code and length
are checked, and a reply pymodbus skips (another transaction or unit id) or cannot decode is reported
as what it is, not as no reply; SO_KEEPALIVE and TCP_USER_TIMEOUT catch half-open sockets; pymodbus's
own reconnect is off (the poller owns reconnecting).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Sequence

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ExceptionResponse, ModbusPDU

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

from .decode import CompiledRead, TagSpec, compile_reads
from .encode import encode_bit, encode_coil, encode_registers
from .planner import Limits, ReadRequest
from .types import Table

logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # failures are reported by the poller

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
        self._client: AsyncModbusTcpClient | None = None
        self._sent = self._received = b""  # the last request frame, and what came back since (raw)
        self._specs = {(t.asset, t.tag): t for t in tags}  # what write() needs of each tag
        self._io = asyncio.Lock()  # one request in flight per connection: reads and writes alike
        self._writing = asyncio.Lock()  # a write's read, write and read-back are not interleaved with another

    def describe_plan(self) -> list[str]:
        return [str(r.request) for r in self.reads]

    async def connect(self) -> None:
        await self.close()
        client = AsyncModbusTcpClient(
            self.host, port=self.port, timeout=self.timeout, retries=0,
            reconnect_delay=0, reconnect_delay_max=0, name=self.device_id, trace_packet=self._trace,
        )
        try:
            async with asyncio.timeout(self.timeout):
                ok = await client.connect()
        except TimeoutError:
            ok = False
        if not ok:
            client.close()
            raise DeviceUnreachable(self.device_id, f"cannot connect to {self.host}:{self.port}")
        _tune_socket(client, self.timeout)
        self._client = client

    async def close(self) -> None:
        self._drop()

    def bad(self, reason: str, ts: float) -> list[Reading]:
        return [r for read in self.reads for r in read.bad(reason, ts)]

    async def read(self) -> ReadResult:
        result = ReadResult()
        for read in self.reads:
            reply = await self._request(read)
            ts = time.time()
            if isinstance(reply, DeviceException):
                result.errors.append(reply)
                result.extend(read.bad(reply.detail, ts))
            elif read.request.table.is_bits:
                result.extend(read.decode_bits(reply.bits, ts))
            else:
                readings = read.decode_registers(reply.registers, ts)
                if rejected := [r for r in readings if r.quality is Quality.BAD]:
                    result.errors.append(BadValue.of(self.device_id, rejected))
                result.extend(readings)
        return result

    async def _request(self, read: CompiledRead) -> ModbusPDU | DeviceException:
        client = self._client
        if client is None or not client.connected:
            raise DeviceUnreachable(self.device_id, "not connected")
        req = read.request
        call = {
            Table.COIL: client.read_coils,
            Table.DISCRETE: client.read_discrete_inputs,
            Table.HOLDING: client.read_holding_registers,
            Table.INPUT: client.read_input_registers,
        }[req.table]
        try:
            async with self._io, asyncio.timeout(self.timeout):
                reply = await call(req.address, count=req.count, device_id=req.unit)
        except TimeoutError:
            open_ = client.connected  # pymodbus closes the connection on a frame it cannot decode
            self._drop()  # a late reply must never be taken for the next request
            why = _unmatched(self._sent, self._received, open_) if self._received else None
            if why is not None:  # an answer came, but pymodbus did not take it for the reply
                raise BadReply(self.device_id, f"{why} in reply to {req}") from None
            if self._received:  # a fitting reply came, but was not taken in time: the gateway was busy
                raise DeviceTimeout(self.device_id, f"the reply to {req} came but was not taken within "
                                                    f"{self.timeout:g}s (the gateway was busy)") from None
            raise DeviceTimeout(self.device_id, f"no reply in {self.timeout:g}s to {req}") from None
        except ModbusException as exc:
            self._drop()
            raise DeviceUnreachable(self.device_id, f"{req}: {exc}") from exc
        return self._check(req, reply)

    def _check(self, req: ReadRequest, reply: ModbusPDU) -> ModbusPDU | DeviceException:
        fc = req.table.function_code
        if isinstance(reply, ExceptionResponse) or reply.function_code == fc | 0x80:
            code = getattr(reply, "exception_code", 0)
            name = EXCEPTION_NAMES.get(code, "unknown")
            return DeviceException(self.device_id, f"exception {code} ({name}) for {req}")
        if reply.function_code != fc:
            self._drop()
            raise BadReply(self.device_id, f"function code {reply.function_code} to a request with {fc}")
        got = len(reply.bits) if req.table.is_bits else len(reply.registers)
        if (req.table.is_bits and got < req.count) or (not req.table.is_bits and got != req.count):
            self._drop()
            raise BadReply(self.device_id, f"{got} values in reply to {req}")
        return reply

    def _trace(self, sending: bool, frame: bytes) -> bytes:
        """pymodbus skips a reply with another transaction or unit id (and waits on), and closes the
        connection on a frame it cannot decode: keep the raw bytes so a timeout can say what came."""
        if sending:
            self._sent, self._received = frame, b""
        else:
            self._received = frame  # everything not yet taken as a reply, from a frame boundary
        return frame

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
        read = CompiledRead(ReadRequest(spec.unit, spec.table, spec.address, count, ((spec.key, 0),)), ())
        reply = await self._request(read)
        if isinstance(reply, DeviceException):
            raise reply
        return list(reply.bits[:1]) if spec.table.is_bits else list(reply.registers)

    async def _write_request(self, spec: TagSpec, fc: int, values: list[int] | list[bool]) -> None:
        client = self._client
        if client is None or not client.connected:
            raise DeviceUnreachable(self.device_id, "not connected")
        what = f"write (FC {fc}) of unit {spec.unit} {spec.table} {spec.address}+{len(values)}"
        try:
            async with self._io, asyncio.timeout(self.timeout):
                if fc == 5:
                    reply = await client.write_coil(spec.address, bool(values[0]), device_id=spec.unit)
                elif fc == 6:
                    reply = await client.write_register(spec.address, int(values[0]), device_id=spec.unit)
                else:
                    reply = await client.write_registers(spec.address, [int(v) for v in values],
                                                         device_id=spec.unit)
        except TimeoutError:
            self._drop()  # a late reply must never be taken for the next request
            raise DeviceTimeout(self.device_id, f"no reply in {self.timeout:g}s to {what}; "
                                                "the PLC may or may not have applied it") from None
        except ModbusException as exc:
            self._drop()
            raise DeviceUnreachable(self.device_id, f"{what}: {exc}") from exc
        if isinstance(reply, ExceptionResponse) or reply.function_code == fc | 0x80:
            code = getattr(reply, "exception_code", 0)
            raise DeviceException(self.device_id,
                                  f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')}) for {what}")
        if reply.function_code != fc:
            self._drop()
            raise BadReply(self.device_id, f"function code {reply.function_code} to a request with {fc}")
        # The reply echoes the address (and the count of FC 16): a reply to another request is caught
        # here. The value it echoes is not checked: some servers answer what they hold, and the read
        # back is what says whether the value was taken.
        echo = getattr(reply, "address", None), getattr(reply, "count", len(values)) if fc == 16 else len(values)
        if echo != (spec.address, len(values)):
            self._drop()
            raise BadReply(self.device_id, f"reply to {what} is for address {echo[0]}+{echo[1]}")


def _engineering(spec: TagSpec, raw: Sequence[int] | Sequence[bool]) -> object:
    """The engineering value of one tag's own registers (None when they do not decode)."""
    if spec.table.is_bits:
        return bool(raw[0])
    try:
        value = spec.fmt.decode([int(r) for r in raw])
    except (struct.error, UnicodeDecodeError, ValueError):
        return None
    return spec.transform.apply(value)[0]


def _unmatched(sent: bytes, got: bytes, connection_open: bool = False) -> str | None:
    """Why ``got`` is no reply to the request frame ``sent`` (both MBAP + PDU, Modbus TCP §4.1);
    None for a complete, fitting reply on a connection pymodbus kept open (it decoded it, late)."""
    if len(got) < 8:
        return f"a {len(got)}-byte fragment"
    tid, want_tid = int.from_bytes(got[:2], "big"), int.from_bytes(sent[:2], "big")
    if tid != want_tid:
        return f"transaction id {tid} instead of {want_tid}"
    if got[2:4] != b"\x00\x00":
        return f"protocol id {int.from_bytes(got[2:4], 'big')} instead of 0"
    if got[6] != sent[6]:
        return f"unit {got[6]} instead of {sent[6]}"
    size = int.from_bytes(got[4:6], "big") + 6
    if len(got) < size:
        return f"{len(got)} of the {size} bytes its header announces"
    if connection_open:
        return None
    return f"an undecodable frame (function code {got[7]}, {size} bytes)"


def _tune_socket(client: AsyncModbusTcpClient, timeout: float) -> None:
    transport = getattr(client.ctx, "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux: unacknowledged data fails the socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(max(timeout, 1.0) * 3000))
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
