"""Modbus TCP driver on pymodbus: one connection per device, one request in flight at a time.

PITFALLS.md: pymodbus does not guard against a late reply being taken for the next request, so a
timeout drops the connection before anything else is sent; every reply's function code and length
are checked; SO_KEEPALIVE and TCP_USER_TIMEOUT catch half-open sockets; pymodbus's own reconnect
is off (the poller owns reconnecting).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Sequence

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from drivers import BadReply, DeviceException, DeviceTimeout, DeviceUnreachable, DriverError
from gateway.model import Reading

from .decode import CompiledRead, TagSpec, compile_reads
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


class ReadResult(list[Reading]):
    """Readings of one cycle, plus the requests that failed without breaking the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[DriverError] = []


class ModbusTcpDriver:
    def __init__(self, *, device_id: str, host: str, port: int, timeout: float,
                 tags: Sequence[TagSpec], limits: Limits = Limits()) -> None:
        self.device_id = device_id
        self.host, self.port, self.timeout = host, port, timeout
        self.reads: list[CompiledRead] = compile_reads(tags, limits)
        self._client: AsyncModbusTcpClient | None = None

    def describe_plan(self) -> list[str]:
        return [str(r.request) for r in self.reads]

    async def connect(self) -> None:
        await self.close()
        client = AsyncModbusTcpClient(
            self.host, port=self.port, timeout=self.timeout, retries=0,
            reconnect_delay=0, reconnect_delay_max=0, name=self.device_id,
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
                result.extend(read.decode_registers(reply.registers, ts))
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
            async with asyncio.timeout(self.timeout):
                reply = await call(req.address, count=req.count, device_id=req.unit)
        except TimeoutError:
            self._drop()  # a late reply must never be taken for the next request
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

    def _drop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


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
