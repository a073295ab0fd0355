"""Secured OPC-UA connects a server refuses, against real servers: what the driver raises and says.

The asyncua servers of simulators/reactors.py refuse the way PLCs do (a ServiceFault in place of
the OpenSecureChannelResponse); tests/opcua_node/server.mjs is a node-opcua server, used when
node and its modules are installed (``npm ci`` in tests/opcua_node), skipped otherwise.

Every refusal is a DriverError (never asyncua's AssertionError) whose message names what to
change: the gateway's certificate file and thumbprint, the pinned certificate, the configured
mode and policy and what the server offers, the user name and the password settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from asyncua import Client
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

from drivers import DeviceTimeout, DeviceUnreachable, DriverError
from drivers.opcua import AuthRefused, OpcTagSpec, OpcUaDriver, Security, SecurityMismatch, SecurityTimeout
from gateway.brokers import free_port
from gateway.metrics import Metrics
from gateway.model import Quality
from gateway.poller import DeviceBatch, Poller
from simulators.reactors import NAMESPACE, ReactorServer

from .certs import OpcUaCertificate, opcua_certificate
from .helpers import wait_until

pytestmark = pytest.mark.integration
DEVICE = "reactors-plc"
SERVER_URI = "urn:freeopcua:python:server"  # asyncua's server application URI
TAGS = [OpcTagSpec("reactor-a", "temperature", f"nsu={NAMESPACE};s=ReactorA.Temperature", expected="float")]
PASSWORD_SETTINGS = ("EDGE_GATEWAY_OPCUA_PASSWORD", "password_file")


@dataclass(frozen=True)
class Pki:
    plc: OpcUaCertificate  # the server's own
    gateway: OpcUaCertificate
    other_plc: OpcUaCertificate  # another PLC's: pinned by mistake
    trusted: Path  # the server's trust list (a directory), without the gateway's certificate


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    trusted = tmp_path / "trusted"
    other_client = opcua_certificate(trusted, "other-client", "urn:other:client", server=False)  # a list is never empty
    other_client.pem.unlink()
    other_client.key.unlink()
    return Pki(plc=opcua_certificate(tmp_path, "plc", SERVER_URI, server=True),
               gateway=opcua_certificate(tmp_path, "gateway", "urn:ninu:edge-gateway:edge-01", server=False),
               other_plc=opcua_certificate(tmp_path, "other-plc", SERVER_URI, server=True),
               trusted=trusted)


@contextlib.asynccontextmanager
async def plc(pki: Pki, **options: object) -> AsyncIterator[ReactorServer]:
    """The reactors' server with SignAndEncrypt/Basic256Sha256 only, and ``options``."""
    server = ReactorServer(security="SignAndEncrypt", certificate=pki.plc.cert, private_key=pki.plc.key,
                           **options)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def driver(endpoint: str, security: Security, *, timeout: float = 2.0, username: str | None = None,
           password: str | None = None) -> OpcUaDriver:
    return OpcUaDriver(device_id=DEVICE, endpoint=endpoint, mode="poll", interval=0.1, timeout=timeout,
                       tags=TAGS, username=username, password=password, security=security)


def secured(pki: Pki, *, mode: str = "SignAndEncrypt", pin: OpcUaCertificate | None = None) -> Security:
    return Security(mode, "Basic256Sha256", pki.gateway.cert, pki.gateway.key, pin.cert if pin else None)


async def refusal(d: OpcUaDriver) -> DriverError:
    """What connect() raises: a DriverError (an AssertionError or anything else fails the test)."""
    with pytest.raises(DriverError) as info:
        await d.connect()
    assert d._client is None
    return info.value


async def connects(d: OpcUaDriver) -> None:
    await d.connect()
    try:
        (reading,) = await d.read()
        assert reading.quality is Quality.GOOD, reading
    finally:
        await d.close()


def says(error: DriverError, *parts: str) -> None:
    text = str(error)
    missing = [p for p in parts if p not in text]
    assert not missing, f"{missing} not in: {text}"


# -- the server does not trust the gateway's certificate ------------------------------------------

@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "from-discovery"])
async def test_untrusted_certificate_is_named_and_trusting_it_needs_no_restart(pki: Pki, pinned: bool) -> None:
    """Checked at OpenSecureChannel (node-opcua, PLCs): asyncua alone raises a bare AssertionError here."""
    async with plc(pki, trusted=pki.trusted) as server:
        d = driver(server.endpoint, secured(pki, pin=pki.plc if pinned else None))
        error = await refusal(d)
        assert type(error) is SecurityMismatch and error.kind == "security"
        says(error, f"cannot connect to {server.endpoint}: the server does not trust the gateway's certificate "
                    f"(BadSecurityChecksFailed): trust {pki.gateway.cert} (SHA-1 thumbprint {pki.gateway.thumbprint}) "
                    f"on the PLC")
        assert server.refused, "the server saw and refused the request"
        shutil.copy(pki.gateway.cert, pki.trusted)  # what the PLC's administrator does
        await connects(d)  # the same driver, the next connect: no restart


async def test_untrusted_at_create_session_with_asyncuas_trust_store(pki: Pki) -> None:
    """asyncua's own CertificateValidator checks at CreateSession (BadCertificateUntrusted)."""
    async with plc(pki) as server:
        store = TrustStore([pki.trusted], [])
        await store.load()
        assert server.server is not None
        server.server.set_certificate_validator(CertificateValidator(
            CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT, store))
        d = driver(server.endpoint, secured(pki, pin=pki.plc))
        error = await refusal(d)
        assert type(error) is SecurityMismatch
        says(error, "the server does not trust the gateway's certificate (BadCertificateUntrusted)",
             str(pki.gateway.cert), pki.gateway.thumbprint)
        shutil.copy(pki.gateway.cert, pki.trusted)
        await store.load_trust()  # the server reloads its trust list; the gateway just connects again
        await connects(d)


async def test_poller_reports_the_refusal_and_recovers_once_trusted(pki: Pki) -> None:
    """The message is what the log, /healthz's last_error and the tags' bad reason show."""
    async with plc(pki, trusted=pki.trusted) as server:
        queue: asyncio.Queue[DeviceBatch] = asyncio.Queue()
        metrics = Metrics()
        poller = Poller(driver=driver(server.endpoint, secured(pki, pin=pki.plc)), interval=0.1, timeout=2.0,
                        requests=1, out=queue, metrics=metrics, backoff_cap=0.2)
        task = asyncio.create_task(poller.run())
        try:
            await wait_until(lambda: poller.last_error is not None, 10, "the refusal")
            assert pki.gateway.thumbprint in (poller.last_error or "")
            bad = await asyncio.wait_for(queue.get(), 5)
            assert not bad.connected
            reason = bad.readings[0].reason or ""
            assert reason.startswith(f"security: {DEVICE}: cannot connect to {server.endpoint}: the server does not "
                                     f"trust the gateway's certificate"), reason
            assert metrics.poll_errors.labels(DEVICE, "security")._value.get() >= 1
            shutil.copy(pki.gateway.cert, pki.trusted)
            await wait_until(lambda: poller.connected, 10, "the connect once the certificate is trusted")
        finally:
            poller.stop()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- the pinned server certificate is not the server's --------------------------------------------

async def test_pinned_certificate_of_another_plc_names_both_thumbprints(pki: Pki) -> None:
    """asyncua's server cannot decrypt the request and stays silent; its discovery endpoint tells."""
    async with plc(pki) as server:
        error = await refusal(driver(server.endpoint, secured(pki, pin=pki.other_plc), timeout=1.0))
    assert isinstance(error, SecurityTimeout) and isinstance(error, DeviceTimeout) and error.kind == "security"
    says(error, "is server_certificate the server's certificate? It is not:",
         f"security.server_certificate {pki.other_plc.cert} (SHA-1 {pki.other_plc.thumbprint}) is not the server's "
         f"certificate; the server's is SHA-1 {pki.plc.thumbprint}",
         "export it from the PLC and set security.server_certificate to it")


async def test_pinned_certificate_of_another_plc_without_discovery_is_a_timeout_with_a_hint(pki: Pki) -> None:
    """Silent, and no endpoint to read the server's certificate from: the gateway can only suggest."""
    async with plc(pki, discovery=False) as server:
        error = await refusal(driver(server.endpoint, secured(pki, pin=pki.other_plc), timeout=1.0))
    assert type(error) is DeviceTimeout and error.kind == "timeout"
    says(error, "security SignAndEncrypt: is server_certificate the server's certificate?")


# -- no endpoint with the configured mode and policy ----------------------------------------------

WITH_DISCOVERY = [  # mode, pinned, the message after "cannot connect to <endpoint>: "
    ("Sign", False, "the server has no endpoint with security.mode Sign and security.policy Basic256Sha256; it "
                    "offers SignAndEncrypt/Basic256Sha256: set the device's security.mode and security.policy to "
                    "one of these"),
    ("Sign", True, "the server has no endpoint with security.mode Sign and security.policy Basic256Sha256; it "
                   "offers SignAndEncrypt/Basic256Sha256"),
    ("None", False, "the server has no endpoint without security (security.mode None); it offers "
                    "SignAndEncrypt/Basic256Sha256: set the device's security (mode, policy, certificate, private_key"),
]
WITHOUT_DISCOVERY = [  # the server refuses channels without security, even to list its endpoints
    ("SignAndEncrypt", False, "the server offers no endpoint without security, not even to list its endpoints "
                              "(BadSecurityPolicyRejected), so the gateway cannot read its certificate: set the "
                              "device's security.server_certificate to the PLC's certificate"),
    ("None", False, "the server refused a connection without security (BadSecurityPolicyRejected), it has no "
                    "endpoint with security.mode None: set the device's security"),
]


@pytest.mark.parametrize("discovery", [True, False], ids=["discovery", "no-discovery"])
async def test_no_endpoint_with_the_configured_mode_lists_what_the_server_offers(pki: Pki, discovery: bool) -> None:
    async with plc(pki, discovery=discovery) as server:
        for mode, pinned, expected in WITH_DISCOVERY if discovery else WITHOUT_DISCOVERY:
            security = Security() if mode == "None" else secured(pki, mode=mode, pin=pki.plc if pinned else None)
            error = await refusal(driver(server.endpoint, security, timeout=1.0))  # Sign, pinned: a silent server
            assert isinstance(error, SecurityMismatch) and error.kind == "security", (mode, pinned)
            says(error, f"cannot connect to {server.endpoint}: {expected}")


# -- user name and password -----------------------------------------------------------------------

USERS = [  # user name, password, the message after "cannot connect to <endpoint>: "
    ("edge-01", "wrong", "the server refused user name 'edge-01' or its password (BadUserAccessDenied): check the "
                         "device's username, and the password in EDGE_GATEWAY_OPCUA_PASSWORD or, when that is not "
                         "set, the device's password_file"),
    ("edge-01", None, "the server refused user name 'edge-01' without a password"),
    ("operator", "s3cret", "the server refused user name 'operator' or its password"),
    (None, None, "the server refused an anonymous session (BadIdentityTokenRejected): it requires a user name: set "
                 "the device's username, and its password in EDGE_GATEWAY_OPCUA_PASSWORD"),
]


async def test_refused_user_names_the_settings(pki: Pki) -> None:
    shutil.copy(pki.gateway.cert, pki.trusted)
    async with plc(pki, trusted=pki.trusted, users={"edge-01": "s3cret"}) as server:
        for username, password, expected in USERS:
            error = await refusal(driver(server.endpoint, secured(pki, pin=pki.plc), username=username,
                                         password=password))
            assert type(error) is AuthRefused and error.kind == "auth", username
            assert isinstance(error, DeviceUnreachable)  # no session: callers that catch that still do
            says(error, f"cannot connect to {server.endpoint}: {expected}", *PASSWORD_SETTINGS)
        await connects(driver(server.endpoint, secured(pki, pin=pki.plc), username="edge-01", password="s3cret"))


async def test_refused_user_without_security() -> None:
    server = ReactorServer(users={"edge-01": "s3cret"})
    await server.start()
    try:
        error = await refusal(driver(server.endpoint, Security(), username="edge-01", password="nope"))
        await connects(driver(server.endpoint, Security(), username="edge-01", password="s3cret"))
    finally:
        await server.stop()
    assert type(error) is AuthRefused
    says(error, "the server refused user name 'edge-01' or its password", *PASSWORD_SETTINGS)


# -- the asyncua bug this driver works around -----------------------------------------------------

async def _answer_open_with(body: bytes) -> tuple[asyncio.Server, str]:
    """A bare OPC-UA TCP server: acknowledges Hello, answers OpenSecureChannel (security None) with
    ``body`` in an OPN message, and closes. The smallest server that shows asyncua's trouble."""
    from asyncua import ua
    from asyncua.common.connection import SecureConnection, TransportLimits
    from asyncua.common.utils import Buffer
    from asyncua.crypto.security_policies import SecurityPolicyNone
    from asyncua.ua.ua_binary import header_from_binary, uatcp_to_binary

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel = SecureConnection(SecurityPolicyNone(), TransportLimits(65535, 65535, 0, 0))
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                start = await reader.readexactly(8)  # message type, chunk type, size
                data = Buffer(start + await reader.readexactly(int.from_bytes(start[4:], "little") - 8))
                header = header_from_binary(data)
                if header.MessageType == ua.MessageType.Hello:
                    ack = ua.Acknowledge(ReceiveBufferSize=65535, SendBufferSize=65535)
                    writer.write(uatcp_to_binary(ua.MessageType.Acknowledge, ack))
                elif header.MessageType == ua.MessageType.SecureOpen:
                    request = channel.receive_from_header_and_body(header, data)
                    writer.write(channel.message_to_binary(body, message_type=ua.MessageType.SecureOpen,
                                                           request_id=request.request_id()))
                    await writer.drain()
                    break
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"opc.tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}/"


async def test_bare_service_fault_to_open_secure_channel() -> None:
    """asyncua 2.1.0 raises a bare AssertionError for a ServiceFault answering OpenSecureChannel
    (ua_client.py: ``assert isinstance(self._open_secure_channel_exchange, ...)``). When its part
    of this test fails, asyncua reports the status itself and drivers/opcua.py's _SocketProtocol
    can go."""
    from asyncua import ua
    from asyncua.ua.ua_binary import struct_to_binary

    fault = ua.ServiceFault()
    fault.ResponseHeader.ServiceResult = ua.StatusCode(ua.StatusCodes.BadSecurityChecksFailed)
    server, endpoint = await _answer_open_with(struct_to_binary(fault))
    async with server:
        with pytest.raises(AssertionError):  # asyncua 2.1.0 alone
            await Client(endpoint, timeout=2).connect()
        error = await refusal(driver(endpoint, Security()))
    assert type(error) is DeviceUnreachable
    says(error, f"cannot connect to {endpoint}: BadSecurityChecksFailed")


async def test_unreadable_answer_to_open_secure_channel_is_a_driver_error() -> None:
    """Whatever asyncua trips on while connecting becomes a DriverError naming where it tripped."""
    server, endpoint = await _answer_open_with(b"\x01\x00\xc2\x01" + b"\x00" * 8)  # OpenSecureChannelResponse, cut
    async with server:
        error = await refusal(driver(endpoint, Security()))
    assert type(error) is DeviceUnreachable
    says(error, f"cannot connect to {endpoint}: AssertionError (at ua_client.py:")


async def test_unreadable_certificate_file_is_named(pki: Pki) -> None:
    missing = pki.gateway.cert.with_name("nope.der")
    d = driver(f"opc.tcp://127.0.0.1:{free_port()}/", Security("SignAndEncrypt", "Basic256Sha256", missing,
                                                                   pki.gateway.key, pki.plc.cert))
    error = await refusal(d)
    assert type(error) is SecurityMismatch
    says(error, f"cannot load the gateway's certificate or key (security.certificate {missing}", "No such file")


# -- node-opcua ---------------------------------------------------------------------------------

NODE_DIR = Path(__file__).parent / "opcua_node"


def _node_missing() -> str | None:
    node = shutil.which("node")
    if node is None:
        return "node is not installed (Node.js 20 or newer, with npm)"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < 20:
        return f"node {version} is too old for node-opcua 2.186 (tested with Node.js 20)"
    if not (NODE_DIR / "node_modules" / "node-opcua").is_dir():
        return f"node-opcua is not installed: run npm ci in {NODE_DIR}"
    return None


@dataclass(frozen=True)
class NodePlc:
    endpoint: str
    pki: Path  # node-opcua's certificate store
    plc: OpcUaCertificate
    other_plc: OpcUaCertificate
    gateway: OpcUaCertificate  # trusted from the start
    newcomer: OpcUaCertificate  # not trusted until a test moves it


@pytest.fixture(scope="module")
def node_plc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodePlc]:
    """A node-opcua server: SignAndEncrypt/Basic256Sha256 only (no None endpoint), user edge-01."""
    missing = _node_missing()
    if missing:
        pytest.skip(missing)
    base = tmp_path_factory.mktemp("node-opcua")
    uri = "urn:ninu:plant-1:node-plc"
    pki = base / "pki"
    plc_cert = opcua_certificate(base, "plc", uri, server=True)
    gateway = opcua_certificate(base, "gateway", "urn:ninu:edge-gateway:edge-01", server=False)
    (pki / "trusted" / "certs").mkdir(parents=True)
    shutil.copy(gateway.pem, pki / "trusted" / "certs" / "gateway.pem")
    options = {"port": free_port(), "certificate": str(plc_cert.pem), "privateKey": str(plc_cert.key),
               "pki": str(pki), "applicationUri": uri, "modes": ["SignAndEncrypt"], "users": {"edge-01": "s3cret"}}
    with (base / "node.log").open("wb") as log:
        proc = subprocess.Popen(["node", str(NODE_DIR / "server.mjs"), json.dumps(options)], cwd=NODE_DIR,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    try:
        ready = _ready(proc, deadline=time.monotonic() + 30)
        yield NodePlc(ready["endpoint"], pki, plc_cert, opcua_certificate(base, "other-plc", uri, server=True),
                      gateway, opcua_certificate(base, "newcomer", "urn:ninu:edge-gateway:edge-02", server=False))
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(proc: subprocess.Popen[bytes], deadline: float) -> dict[str, str]:
    """The server's ready line, its only output on stdout."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buffer = b""
    while time.monotonic() < deadline:
        if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"node-opcua server exited with {proc.wait()}")
        buffer += chunk
        for line in buffer.splitlines():
            if line.startswith(b'{"ready"'):
                result: dict[str, str] = json.loads(line)
                return result
    raise AssertionError("node-opcua server not ready in time")


def node_driver(node: NodePlc, client: OpcUaCertificate, *, mode: str = "SignAndEncrypt",
                pin: OpcUaCertificate | None = None, username: str | None = "edge-01",
                password: str | None = "s3cret") -> OpcUaDriver:
    security = Security() if mode == "None" else Security(mode, "Basic256Sha256", client.cert, client.key,
                                                          pin.cert if pin else None)
    return driver(node.endpoint, security, username=username, password=password)


async def test_node_opcua_refusals(node_plc: NodePlc) -> None:
    """Every refusal against one node-opcua server (a server start costs seconds; tests spread over
    workers would each start one)."""
    node = node_plc
    await connects(node_driver(node, node.gateway, pin=node.plc))

    # A client certificate the server does not trust yet; node-opcua keeps it in rejected/, named by
    # the thumbprint the message gives; moved to trusted/, the next connect succeeds.
    d = node_driver(node, node.newcomer, pin=node.plc)
    error = await refusal(d)
    assert type(error) is SecurityMismatch, error
    thumbprint = node.newcomer.thumbprint
    says(error, "the server does not trust the gateway's certificate (BadSecurityChecksFailed): trust "
                f"{node.newcomer.cert} (SHA-1 thumbprint {thumbprint}) on the PLC")
    rejected = node.pki / "rejected"
    await wait_until(lambda: any(thumbprint in p.name for p in rejected.glob("*")), 5, "the certificate in rejected/")
    (found,) = (p for p in rejected.glob("*") if thumbprint in p.name)
    found.rename(node.pki / "trusted" / "certs" / found.name)
    deadline = time.monotonic() + 10  # node-opcua notices the move through a file watcher
    while True:
        try:
            await connects(d)
            break
        except SecurityMismatch:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)

    # The pinned certificate is another PLC's: node-opcua cannot decrypt the request and says so.
    error = await refusal(node_driver(node, node.gateway, pin=node.other_plc))
    assert type(error) is SecurityMismatch, error
    says(error, "the server could not decrypt the secure channel request",
         f"security.server_certificate {node.other_plc.cert} (SHA-1 {node.other_plc.thumbprint}), which is not the "
         f"server's certificate")

    # No None endpoint: nothing pinned (the gateway cannot read the server's certificate), mode None.
    error = await refusal(node_driver(node, node.gateway))
    assert type(error) is SecurityMismatch, error
    says(error, "the server offers no endpoint without security, not even to list its endpoints "
                "(BadSecurityPolicyRejected)", "security.server_certificate")
    error = await refusal(node_driver(node, node.gateway, mode="None"))
    assert type(error) is SecurityMismatch, error
    says(error, "the server refused a connection without security (BadSecurityPolicyRejected)")

    # A mode the server does not offer (it answers with a transport error message and closes).
    error = await refusal(node_driver(node, node.gateway, mode="Sign", pin=node.plc))
    assert type(error) is SecurityMismatch, error
    says(error, "check that it has an endpoint with security.mode Sign and security.policy Basic256Sha256")

    # User name and password.
    for username, password, expected in [
        ("edge-01", "wrong", "the server refused user name 'edge-01' or its password (BadUserAccessDenied)"),
        (None, None, "the server refused an anonymous session (BadIdentityTokenInvalid): it requires a user name"),
    ]:
        error = await refusal(node_driver(node, node.gateway, pin=node.plc, username=username, password=password))
        assert type(error) is AuthRefused and error.kind == "auth", error
        says(error, expected, *PASSWORD_SETTINGS)
