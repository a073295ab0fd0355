"""OPC-UA simulator of the plant's three reactor PLCs (asyncua server), with a process model.

Each reactor runs a batch cycle idle -> heating -> mixing -> cooling -> transferring -> cleaning ->
idle. Temperature follows the step's setpoint with a first-order lag and noise; pressure rises with
temperature; pH drifts towards the recipe's target. The model advances in fixed steps of ``STEP``
plant seconds, so a run is deterministic for a seed and a number of steps; ``time_scale`` runs
plant time faster than the wall clock. Nodes are ``ns=<idx>;s=Reactor<X>.<Variable>`` in the
namespace ``NAMESPACE``.

Faults the tests drive: temperature excursion, pressure spike, pH drift, a sensor with Bad status,
a value that is NaN or infinite with Good status,
a server restart (optionally with shifted namespace indexes), a PLC program download (a reactor's
nodes vanish and come back).

Security as PLCs have it (``ReactorServer`` options): one security mode and policy; a list of
trusted client certificates checked at OpenSecureChannel, as node-opcua and most PLC servers do
(asyncua's own server checks only at CreateSession); no unsecured discovery; user names with
passwords. A refused OpenSecureChannel is answered with a ServiceFault in place of the response
(Part 6, 6.7.4), secured as the response would be, then the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import Server, ua
from asyncua.common.callback import CallbackType
from asyncua.crypto import uacrypto
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.security_policies import SecurityPolicyNone
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.ua_binary import struct_from_binary
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

NAMESPACE = "urn:ninu:plant-1:reactors"
STEP = 0.1
STATUS = {"idle": 0, "mixing": 1, "heating": 2, "cooling": 3, "transferring": 4, "cleaning": 5, "maintenance": 6}
CYCLE = [  # step, plant seconds, temperature setpoint degC, mixing speed rpm
    ("idle", 20, 25.0, 0.0),
    ("heating", 60, 75.0, 60.0),
    ("mixing", 90, 75.0, 120.0),
    ("cooling", 60, 30.0, 40.0),
    ("transferring", 30, 30.0, 20.0),
    ("cleaning", 40, 60.0, 200.0),
]
RECIPES = {
    "A": ("RCP-LIQ-001", 7.0, 1.02),  # recipe, pH target, density target (kg/L)
    "B": ("RCP-DES-014", 9.5, 1.05),
    "C": ("RCP-ESP-007", 5.5, 0.98),
}
NAMES = {"A": "Reactor A - Líquidos", "B": "Reactor B - Desinfectantes", "C": "Reactor C - Especialidades"}
VARIABLES: dict[str, ua.VariantType] = {
    "Status": ua.VariantType.Int32,
    "Temperature": ua.VariantType.Double,
    "TemperatureSetpoint": ua.VariantType.Double,
    "Pressure": ua.VariantType.Double,
    "MixingSpeed": ua.VariantType.Double,
    "PhLevel": ua.VariantType.Double,
    "PhTarget": ua.VariantType.Double,
    "Density": ua.VariantType.Double,
    "DensityTarget": ua.VariantType.Double,
    "BatchId": ua.VariantType.String,
    "RecipeId": ua.VariantType.String,
    "MaintenanceHours": ua.VariantType.Double,
}

# Nodes an HMI (or the gateway) may write; the others are not writable (BadNotWritable). A written
# value becomes the model's state: the temperature setpoint holds until the recipe's next step, a
# status jumps the batch cycle to that step (maintenance holds until another status is written).
# A value the program does not accept is dropped: the node shows the model's value again at once.
WRITABLE = frozenset({"Status", "TemperatureSetpoint", "PhTarget", "DensityTarget", "RecipeId", "MaintenanceHours"})
AMBIENT = 25.0  # degC the jacket holds during maintenance


@dataclass
class ReactorFaults:
    temperature_offset: float = 0.0  # excursion, degC
    pressure_offset: float = 0.0  # spike, bar
    ph_offset: float = 0.0  # drift beyond the recipe's tolerance
    bad: set[str] = field(default_factory=set)  # variables reported with BadSensorFailure
    values: dict[str, object] = field(default_factory=dict)  # variable -> value published instead, status Good (NaN)

    def clear(self) -> None:
        self.temperature_offset = self.pressure_offset = self.ph_offset = 0.0
        self.bad.clear()
        self.values.clear()


@dataclass
class ReactorModel:
    letter: str
    seed: int = 0
    rng: random.Random = field(init=False)
    steps: int = 0
    step_index: int = 0
    step_left: float = 0.0
    temperature: float = 22.0
    ph: float = 7.0
    density: float = 1.0
    batch: int = 0
    maintenance_hours: float = 0.0
    faults: ReactorFaults = field(default_factory=ReactorFaults)
    setpoint_override: float | None = None  # written temperature setpoint, until the next cycle step
    maintenance: bool = False  # written status maintenance: the cycle stands still
    off_spec: float = 0.0  # share of batches whose pH runs out of the recipe's tolerance while mixing (seeded)
    off_spec_batches: set[str] = field(default_factory=set)  # batch ids that were made off-spec
    # The model's own trace of each batch (heating to transferring): variable -> [min, max, sum, steps]
    trace: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.recipe, self.ph_target, self.density_target = RECIPES[self.letter]
        self.ph = self.ph_target
        self.density = self.density_target
        self.maintenance_hours = 100.0 * (ord(self.letter) - 64)
        # Reactors start at different points of the cycle.
        self.step_index = (ord(self.letter) - 65) % len(CYCLE)
        self.step_left = CYCLE[self.step_index][1]
        self.batch = 1000 * (ord(self.letter) - 64)

    @property
    def status(self) -> str:
        return "maintenance" if self.maintenance else CYCLE[self.step_index][0]

    @property
    def setpoint(self) -> float:
        if self.setpoint_override is not None:
            return self.setpoint_override
        return AMBIENT if self.maintenance else CYCLE[self.step_index][2]

    def step(self) -> None:
        self.steps += 1
        if not self.maintenance:
            self.step_left -= STEP
            if self.step_left <= 0:
                self.step_index = (self.step_index + 1) % len(CYCLE)
                self.step_left = CYCLE[self.step_index][1]
                self.setpoint_override = None  # the recipe's next step brings its own setpoint
                if self.step_index == 1:
                    self.batch += 1
                    if self.off_spec and self.rng.random() < self.off_spec:
                        self.off_spec_batches.add(self.batch_id)
        setpoint = self.setpoint
        self.temperature += (setpoint - self.temperature) * STEP / 20.0 + self.rng.gauss(0, 0.02)
        self.ph += (self.ph_target - self.ph) * STEP * 0.02 + self.rng.gauss(0, 0.002)
        self.density = self.density_target + self.rng.gauss(0, 0.002)
        self.maintenance_hours += STEP / 3600
        self._record()

    @property
    def batch_id(self) -> str:
        return f"B-{self.letter}-{self.batch:05d}"

    def _record(self) -> None:
        """Add this step's published values to the running batch's trace (a step is STEP plant seconds)."""
        if self.maintenance or not 1 <= self.step_index <= 4:  # heating, mixing, cooling, transferring
            return
        values = self.values()
        trace = self.trace.setdefault(self.batch_id, {})
        for name in ("Temperature", "Pressure", "PhLevel", "Density"):
            v = float(values[name])  # type: ignore[arg-type]
            t = trace.setdefault(name, [v, v, 0.0, 0])
            t[0], t[1], t[2], t[3] = min(t[0], v), max(t[1], v), t[2] + v, t[3] + 1

    def command(self, name: str, value: object) -> bool:
        """Take a value a client wrote to the WRITABLE node ``name``; False: the program drops it."""
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        if name == "Status" and isinstance(value, int) and value in STATUS.values():
            status = next(s for s, code in STATUS.items() if code == value)
            self.maintenance = status == "maintenance"
            self.setpoint_override = None
            if not self.maintenance:
                self.step_index = next(i for i, c in enumerate(CYCLE) if c[0] == status)
                self.step_left = CYCLE[self.step_index][1]
        elif name == "TemperatureSetpoint" and 0.0 <= number <= 150.0:  # NaN fails every comparison
            self.setpoint_override = number
        elif name == "PhTarget" and 0.0 <= number <= 14.0:
            self.ph_target = number
        elif name == "DensityTarget" and 0.0 < number < math.inf:
            self.density_target = number
        elif name == "RecipeId" and isinstance(value, str) and value:
            self.recipe = value
        elif name == "MaintenanceHours" and 0.0 <= number < math.inf:
            self.maintenance_hours = number
        else:
            return False
        return True

    def _off_spec(self) -> float:
        """An off-spec batch: its pH 0.5 above the recipe's target while mixing."""
        return 0.5 if self.batch_id in self.off_spec_batches and CYCLE[self.step_index][0] == "mixing" else 0.0

    def values(self) -> dict[str, object]:
        _, _, _, speed = CYCLE[self.step_index]
        if self.maintenance:
            speed = 0.0
        t = self.temperature + self.faults.temperature_offset
        wobble = math.sin(self.steps / 50)
        return {
            "Status": STATUS[self.status],
            "Temperature": round(t, 3),
            "TemperatureSetpoint": self.setpoint,
            "Pressure": round(1.013 + 0.015 * max(t - 20, 0) + 0.005 * wobble + self.faults.pressure_offset, 4),
            "MixingSpeed": speed + (2.0 * wobble if speed else 0.0),
            "PhLevel": round(self.ph + self.faults.ph_offset + self._off_spec(), 3),
            "PhTarget": self.ph_target,
            "Density": round(self.density, 4),
            "DensityTarget": self.density_target,
            "BatchId": self.batch_id,
            "RecipeId": self.recipe,
            "MaintenanceHours": round(self.maintenance_hours, 3),
        } | self.faults.values


Refusal = Callable[[str, bytes | None], int | None]  # (policy URI, client certificate) -> status code or None


class _GuardedProcessor(UaProcessor):
    """A connection's UaProcessor that may refuse an OpenSecureChannel (``refusal``) with a ServiceFault."""

    refusal: Refusal

    def open_secure_channel(self, algohdr: Any, seqhdr: Any, body: Any) -> None:
        status = None if self._connection.is_open() else self.refusal(algohdr.SecurityPolicyURI,
                                                                      algohdr.SenderCertificate)
        if status is None:
            return super().open_secure_channel(algohdr, seqhdr, body)
        request = struct_from_binary(ua.OpenSecureChannelRequest, body)
        with contextlib.suppress(ua.UaError):  # a policy the server does not offer: the fault goes unsecured
            self._connection.select_policy(algohdr.SecurityPolicyURI, algohdr.SenderCertificate,
                                           request.Parameters.SecurityMode)
        fault = ua.ServiceFault()
        fault.ResponseHeader.ServiceResult = ua.StatusCode(status)
        self.send_response(request.RequestHeader.RequestHandle, seqhdr, fault, ua.MessageType.SecureOpen)
        self._transport.close()  # after the fault is written
        return None


class _GuardedProtocol(OPCUAProtocol):
    refusal: Refusal

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.processor is not None:
            self.processor.__class__ = _GuardedProcessor  # adds no state but the check
            self.processor.refusal = self.refusal  # type: ignore[attr-defined]


class _GuardedListener(BinaryServer):
    refusal: Refusal

    def _make_protocol(self) -> OPCUAProtocol:
        protocol = super()._make_protocol()
        protocol.__class__ = _GuardedProtocol
        protocol.refusal = self.refusal  # type: ignore[attr-defined]
        return protocol


class _GuardedServer(Server):
    """asyncua's Server whose connections may refuse an OpenSecureChannel (``refusal``)."""

    refusal: Refusal

    async def start(self) -> None:  # Server.start with _GuardedListener
        await self._setup_server_nodes()
        await self.iserver.start()
        try:
            host, port = self._get_bind_socket_info()
            listener = _GuardedListener(self.iserver, host, port, self.limits)
            listener.refusal = self.refusal
            self.bserver = listener
            listener.set_policies(self._policies)
            await listener.start()
        except Exception:
            await self.iserver.stop()
            raise


class _Users:
    """asyncua user manager: these user names with these passwords, no anonymous sessions."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(self, _iserver: object, username: str | None = None, password: str | None = None,
                 certificate: object = None) -> User | None:
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


def _certificate_der(data: bytes) -> bytes:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
    return data


class ReactorServer:
    """The reactors' OPC-UA server on ``port`` (0: any free port).

    Security: ``security`` (a mode: None, Sign or SignAndEncrypt) with ``policy``, the server's own
    ``certificate`` and ``private_key``. ``trusted``: a directory of the client certificates (DER or
    PEM) the server trusts; any other is refused at OpenSecureChannel with BadSecurityChecksFailed.
    The directory is read at every OpenSecureChannel: a certificate copied into it is trusted from
    the next connect on. None: every client certificate is accepted. ``discovery``: False refuses
    an OpenSecureChannel without security (BadSecurityPolicyRejected), so a client cannot list the
    endpoints (nor fetch the server's certificate) without the server's certificate, as on a server
    without a None endpoint. ``users``: user names and their passwords; anonymous sessions are then
    refused (asyncua answers BadUserAccessDenied to a wrong password, BadIdentityTokenRejected to an
    anonymous session).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, seed: int = 1, time_scale: float = 1.0,
                 letters: str = "ABC", namespace: str = NAMESPACE, certificate: Path | None = None,
                 private_key: Path | None = None, security: str = "None",
                 policy: str = "Basic256Sha256", trusted: Path | None = None, discovery: bool = True,
                 users: dict[str, str] | None = None, off_spec: float = 0.0) -> None:
        self.host, self.port = host, port
        self.namespace = namespace
        self.models = {x: ReactorModel(x, seed=seed + i, off_spec=off_spec) for i, x in enumerate(letters)}
        self.time_scale = time_scale
        self.frozen = False
        self.certificate, self.private_key, self.security = certificate, private_key, security
        self.policy = policy
        self.trusted, self.discovery, self.users = trusted, discovery, users
        self.refused: list[tuple[str, int]] = []  # OpenSecureChannels refused: policy URI, status code
        self.server: Server | None = None
        self.ns = 0
        self._t0 = 0.0
        self._task: asyncio.Task[None] | None = None
        self._present: set[str] = set()  # reactors whose nodes exist
        self._snapshot: dict[str, dict[str, object]] = {}
        self.extra_namespaces = 0
        self.writes: list[tuple[str, str, object, bool]] = []  # client writes: reactor, node, value, taken
        self._publishing = asyncio.Lock()  # a client write is applied between two publishes, never inside one

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}/reactors"

    async def start(self) -> None:
        logging.getLogger("asyncua").setLevel(logging.ERROR)
        if self.port == 0:
            from gateway.brokers import free_port

            self.port = free_port(self.host)
        users = _Users(self.users) if self.users is not None else None
        if self.trusted is not None or not self.discovery:
            server = _GuardedServer(user_manager=users)  # type: ignore[arg-type]
            server.refusal = self._refusal
        else:
            server = Server(user_manager=users)  # type: ignore[arg-type]
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("NINU reactor PLC simulator")
        if self.users is not None:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        if self.security != "None":
            assert self.certificate and self.private_key
            await server.load_certificate(str(self.certificate))
            await server.load_private_key(str(self.private_key))
            server.set_security_policy([getattr(ua.SecurityPolicyType, f"{self.policy}_{self.security}")])
        for i in range(self.extra_namespaces):  # a redeployed program can register namespaces in another order
            await server.register_namespace(f"urn:ninu:plant-1:other-{i}")
        self.ns = await server.register_namespace(self.namespace)
        self.server = server
        server.subscribe_server_callback(CallbackType.PostWrite, self._on_write)
        for letter in self.models:
            await self._create(letter)
        await server.start()
        self._t0 = time.monotonic() - self._elapsed_wall()
        self._task = asyncio.create_task(self._run(), name="reactor-simulator")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()
        self._present.clear()

    async def restart(self, *, downtime: float = 0.0, shift_namespaces: int = 0) -> None:
        """Stop the server and start a new one on the same port (a PLC reboot or redeploy)."""
        await self.stop()
        await asyncio.sleep(downtime)
        self.extra_namespaces += shift_namespaces
        await self.start()

    async def download(self, letter: str, *, downtime: float = 1.0) -> None:
        """A PLC program download: the reactor's nodes vanish and come back; the server stays up."""
        assert self.server is not None
        obj = self.server.get_node(ua.NodeId(f"Reactor{letter}", self.ns))
        self._present.discard(letter)
        await self.server.delete_nodes([obj], recursive=True)
        await asyncio.sleep(downtime)
        await self._create(letter)

    def _refusal(self, policy_uri: str, certificate: bytes | None) -> int | None:
        """The status an OpenSecureChannel is refused with, None to open it."""
        status = None
        if policy_uri == SecurityPolicyNone.URI:
            if not self.discovery and self.security != "None":
                status = ua.StatusCodes.BadSecurityPolicyRejected
        elif self.trusted is not None and not self._is_trusted(certificate):
            status = ua.StatusCodes.BadSecurityChecksFailed
        if status is not None:
            self.refused.append((policy_uri, status))
        return status

    def _is_trusted(self, certificate: bytes | None) -> bool:
        if not certificate or self.trusted is None:
            return False
        cert = uacrypto.der_from_x509(uacrypto.x509_from_der(certificate))  # the first of a chain
        trusted = (_certificate_der(p.read_bytes()) for p in sorted(self.trusted.glob("*"))
                   if p.suffix.lower() in (".der", ".pem", ".crt") and p.is_file())
        return any(cert == t for t in trusted)

    def node_id(self, letter: str, variable: str) -> str:
        return f"nsu={self.namespace};s=Reactor{letter}.{variable}"

    # -- values ------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Stop the process (values stay put, statuses too); faults set afterwards still apply."""
        self.frozen = True

    def snapshot(self, letter: str) -> dict[str, object]:
        return dict(self._snapshot.get(letter, {}))

    def _elapsed_wall(self) -> float:
        steps = max((m.steps for m in self.models.values()), default=0)
        return steps * STEP / self.time_scale

    async def _create(self, letter: str) -> None:
        assert self.server is not None
        objects = self.server.nodes.objects
        obj = await objects.add_object(ua.NodeId(f"Reactor{letter}", self.ns), f"Reactor{letter}")
        values = self.models[letter].values()
        for name, vtype in VARIABLES.items():
            var = await obj.add_variable(ua.NodeId(f"Reactor{letter}.{name}", self.ns), name, values[name],
                                         varianttype=vtype)
            if name in WRITABLE:
                await var.set_writable()
        self._present.add(letter)
        await self._publish(letter)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            due = int((time.monotonic() - self._t0) * self.time_scale / STEP)
            for letter, model in self.models.items():
                if not self.frozen:  # frozen: the process stands still, injected faults still show
                    for _ in range(min(due - model.steps, 100_000)):
                        model.step()
                if letter in self._present:
                    async with self._publishing:
                        await self._publish(letter)

    async def _on_write(self, event: Any, _dispatcher: Any) -> None:
        """After a client's Write (before its answer): written WRITABLE values become the model's
        state, and every reactor written to is published again, so the node shows what the program
        made of the value (a dropped value reverts at once)."""
        touched: set[str] = set()
        for item, status in zip(event.request_params.NodesToWrite, event.response_params, strict=False):
            node = item.NodeId
            if item.AttributeId != ua.AttributeIds.Value or node.NamespaceIndex != self.ns:
                continue
            reactor, _, name = str(node.Identifier).partition(".")
            letter = reactor.removeprefix("Reactor")
            if letter not in self.models or letter not in self._present:
                continue
            touched.add(letter)
            if status.is_good() and name in WRITABLE:
                value = item.Value.Value.Value if item.Value is not None and item.Value.Value is not None else None
                self.writes.append((letter, name, value, self.models[letter].command(name, value)))
        for letter in sorted(touched):
            async with self._publishing:
                if self.server is not None and letter in self._present:
                    await self._publish(letter)

    async def _publish(self, letter: str) -> None:
        assert self.server is not None
        model = self.models[letter]
        values = model.values()
        now = datetime.now(UTC)
        for name, vtype in VARIABLES.items():
            status = ua.StatusCode(ua.StatusCodes.BadSensorFailure if name in model.faults.bad else ua.StatusCodes.Good)
            dv = ua.DataValue(ua.Variant(values[name], vtype), StatusCode=status, SourceTimestamp=now,
                              ServerTimestamp=now)
            await self.server.write_attribute_value(ua.NodeId(f"Reactor{letter}.{name}", self.ns), dv)
        self._snapshot[letter] = values
