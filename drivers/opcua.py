"""OPC-UA driver on asyncua: ``subscribe`` (monitored items) or ``poll`` (batched Read) per device.

PITFALLS.md, and how this driver meets them:
- A Client is never reused after a loss: every ``connect`` builds a new one, under a timeout, with
  asyncua's own reconnect off (the poller owns reconnecting).
- A dead session is detected three ways: asyncua's health probe (``connection_lost_callback``), a
  subscription whose publish responses stop (``is_stale``), and any request failing.
- Data-change callbacks only append to a deque; readings are built in ``read()``.
- ``nsu=<uri>`` node ids are resolved to namespace indexes on every connect, and the namespace
  array is re-read every ``recheck`` seconds: if it changed (a redeploy), the driver reconnects.
- Nodes that vanish (a PLC program download answers ``BadNodeIdUnknown``) mark only their own tags
  bad; every ``recheck`` seconds the driver tries to monitor them again, so they recover by
  themselves, without a gateway restart.
- A configured security mode is set explicitly; a server that does not offer it fails the connect.
- A refused connect says what to change and where (``_refused``): the user name or password, the
  gateway's certificate the PLC does not trust yet, a pinned server certificate that is not the
  server's, a security mode or policy the server does not offer. asyncua 2.1 turns a refused
  OpenSecureChannel into a bare AssertionError; ``_SocketProtocol`` restores the server's status.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from asyncua import Client, Node, ua
from asyncua.client.ua_client import UASocketProtocol
from asyncua.common.ua_utils import data_type_to_variant_type
from asyncua.crypto import security_policies
from asyncua.ua.ua_binary import nodeid_from_binary, struct_from_binary
from asyncua.ua.uaerrors import UaError

from drivers import (
    BadReply,
    BadValue,
    DeviceException,
    DeviceTimeout,
    DeviceUnreachable,
    DriverError,
    ReadResult,
    WriteNotApplied,
    WriteRefused,
)
from drivers.encoding import EncodeError, Kind, check_int_range, to_raw
from gateway.model import Quality, Reading, Transform

logging.getLogger("asyncua").setLevel(logging.CRITICAL)  # failures are reported by the poller

POLICIES: dict[str, type[security_policies.SecurityPolicy]] = {
    "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
    "Aes128Sha256RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
    "Aes256Sha256RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
}
MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}
EXPECTED = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
}


class SecurityMismatch(DriverError):
    """The secure channel cannot be opened as configured (kind ``security``).

    The server does not trust the gateway's certificate (yet), the pinned ``server_certificate`` is
    not the server's, the server has no endpoint with the configured mode and policy, or it refuses
    the certificate for another reason (expired, revoked, wrong URI). Nothing changes until someone
    changes the configuration on one side; the message says what and where.
    """

    kind = "security"


class SecurityTimeout(SecurityMismatch, DeviceTimeout):
    """A SecurityMismatch that showed as a timeout (kind ``security``, and a DeviceTimeout).

    A server that cannot decrypt the request (encrypted for the pinned certificate, which is not
    its own) may drop it without a word; the gateway then found the mismatch by reading the
    server's certificate from its discovery endpoint.
    """


class AuthRefused(DeviceUnreachable):
    """The server refused the session's user (kind ``auth``): a wrong user name or password, no user
    name where the server allows no anonymous session, or a user that may not connect. A
    DeviceUnreachable too: no session was opened."""

    kind = "auth"


@dataclass(frozen=True, slots=True)
class OpcTagSpec:
    asset: str
    tag: str
    node: str  # as configured: nsu=<uri>;s=... or ns=<i>;s=...
    transform: Transform = Transform()
    expected: str | None = None
    deadband: float | None = None


@dataclass(frozen=True, slots=True)
class Security:
    mode: str = "None"
    policy: str = "Basic256Sha256"
    certificate: Path | None = None
    private_key: Path | None = None
    server_certificate: Path | None = None
    application_uri: str | None = None


class _Handler:
    """asyncua calls this from its publish loop: it must only enqueue."""

    def __init__(self, queue: deque[tuple[ua.NodeId, ua.DataValue]], wake: asyncio.Event) -> None:
        self.queue, self.wake = queue, wake
        self.status: ua.StatusCode | None = None

    def datachange_notification(self, node: Node, _val: Any, data: Any) -> None:
        self.queue.append((node.nodeid, data.monitored_item.Value))
        self.wake.set()

    def status_change_notification(self, status: Any) -> None:
        # A StatusChangeNotification from the server, or a bare StatusCode when asyncua loses the link.
        self.status = ua.StatusCode(getattr(getattr(status, "Status", status), "value", status))
        self.wake.set()


def split_node(node: str) -> tuple[str | None, int | None, str]:
    """``nsu=U;s=X`` -> (U, None, "s=X"); ``ns=2;s=X`` -> (None, 2, "s=X"); ``i=85`` -> (None, 0, "i=85")."""
    if node.startswith("nsu="):
        uri, _, rest = node[4:].partition(";")
        return uri, None, rest
    if node.startswith("ns="):
        idx, _, rest = node[3:].partition(";")
        return None, int(idx), rest
    return None, 0, node


class OpcUaDriver:
    def __init__(self, *, device_id: str, endpoint: str, mode: str, interval: float, timeout: float,
                 tags: Sequence[OpcTagSpec], sampling_interval: float | None = None, queue_size: int = 10,
                 deadband_type: str = "none", max_nodes_per_read: int | None = None, recheck: float = 5.0,
                 username: str | None = None, password: str | None = None,
                 security: Security = Security()) -> None:
        self.device_id = device_id
        self.endpoint, self.mode, self.interval, self.timeout = endpoint, mode, interval, timeout
        self.tags = list(tags)
        self.sampling_ms = (interval if sampling_interval is None else sampling_interval) * 1000
        self.queue_size = queue_size
        self.deadband_type = {"none": 0, "absolute": 1, "percent": 2}[deadband_type]
        self.max_nodes_per_read = max_nodes_per_read
        self.recheck = recheck
        self.username, self.password = username, password
        self.security = security
        self._client: Client | None = None
        self._lost: str | None = None
        self._namespaces: list[str] = []
        self._node_ids: dict[int, ua.NodeId] = {}  # tag index -> resolved node id
        self._by_node: dict[ua.NodeId, list[int]] = {}
        self._missing: dict[int, str] = {}  # tag index -> why it is not monitored / resolvable
        self._handles: dict[int, int] = {}  # tag index -> monitored item handle
        self._queue: deque[tuple[ua.NodeId, ua.DataValue]] = deque()
        self._wake = asyncio.Event()
        self._handler = _Handler(self._queue, self._wake)
        self._subscription: Any = None
        self._next_check = 0.0
        self._limit = 0
        self._writing = asyncio.Lock()  # one write at a time (read, write, read back)
        self._rejected: list[Reading] = []  # values of this read() that cannot be used (NaN, wrong type)

    # -- driver protocol ---------------------------------------------------------------------
    def describe_plan(self) -> list[str]:
        if self.mode == "subscribe":
            return [f"subscription: {len(self.tags)} monitored items, publishing every {self.interval:g}s"]
        per = self.max_nodes_per_read
        n = len(self.tags)
        reads = 1 if not per else -(-n // per)
        return [f"Read of {n} nodes in {reads} request(s) (server limit applies when lower)"]

    def bad(self, reason: str, ts: float) -> list[Reading]:
        return [Reading(t.asset, t.tag, None, Quality.BAD, reason, None, ts) for t in self.tags]

    async def connect(self) -> None:
        await self.close()
        self._lost = None
        client = Client(self.endpoint, timeout=self.timeout, watchdog_intervall=max(self.timeout, 1.0))
        client.name = client.description = f"edge-gateway {self.device_id}"
        client.connection_lost_callback = self._on_lost
        trace = _traced(client)
        if self.username:
            client.set_user(self.username)
            if self.password:
                client.set_password(self.password)
        deadline = asyncio.get_running_loop().time() + self.timeout * 3
        try:
            async with asyncio.timeout_at(deadline):
                await self._secure(client, trace)
                await client.connect()
        except asyncio.CancelledError:  # asyncua closes the socket on errors, not on a cancellation
            client.disconnect_socket()
            raise
        except DriverError:
            await _quiet_disconnect(client)
            raise
        except Exception as exc:  # asyncua raises more than its own errors (an AssertionError, a parse error)
            await _quiet_disconnect(client)
            error = await self._refused(trace, exc, deadline)
            raise error from (None if isinstance(exc, TimeoutError) else exc)
        self._client = client
        try:
            await self._setup()
        except (OSError, UaError, ua.UaStatusCodeError, TimeoutError) as exc:
            await self.close()
            raise DeviceUnreachable(self.device_id, f"session setup failed: {_describe(exc)}") from exc

    async def close(self) -> None:
        client, self._client = self._client, None
        self._subscription = None
        self._handles.clear()
        self._queue.clear()
        if client is not None:
            await _quiet_disconnect(client)

    async def read(self) -> ReadResult:
        client = self._client
        if client is None:
            raise DeviceUnreachable(self.device_id, "not connected")
        if self._lost is not None:
            raise DeviceUnreachable(self.device_id, f"session lost: {self._lost}")
        self._rejected.clear()
        try:
            async with asyncio.timeout(self.timeout * 2):
                readings = await (self._poll() if self.mode == "poll" else self._drain())
                if time.monotonic() >= self._next_check:
                    readings += await self._recheck()
        except TimeoutError:
            raise DeviceTimeout(self.device_id, f"no answer from {self.endpoint} in {self.timeout * 2:g}s") from None
        except (OSError, UaError, ua.UaStatusCodeError, ConnectionError) as exc:
            raise DeviceUnreachable(self.device_id, _describe(exc)) from exc
        result = ReadResult(readings)
        if self._rejected:
            result.errors.append(BadValue.of(self.device_id, self._rejected))
        return result

    # -- connect -----------------------------------------------------------------------------
    async def _on_lost(self, exc: Exception) -> None:
        self._lost = _describe(exc)

    async def _secure(self, client: Client, trace: _Trace) -> None:
        sec = self.security
        if sec.mode == "None":
            return
        assert sec.certificate is not None and sec.private_key is not None
        server_certificate: bytes | str | None = str(sec.server_certificate) if sec.server_certificate else None
        if server_certificate is None:
            # Nothing pinned: read the server's certificate from its endpoints, over a channel without
            # security that carries nothing but the list (what asyncua's set_security does, but
            # keeping the list to say what the server offers when it lacks the configured endpoint).
            trace.discovery = True
            endpoints = await client.connect_and_get_server_endpoints()
            trace.discovery = False
            endpoint = _endpoint(endpoints, sec.mode, sec.policy)
            if endpoint is None:
                raise SecurityMismatch(self.device_id, f"cannot connect to {self.endpoint}: "
                                                       f"{_no_endpoint(sec.mode, sec.policy, endpoints)}")
            server_certificate = _first_certificate(endpoint.ServerCertificate)
        try:
            client.application_uri = (sec.application_uri or _certificate_uri(sec.certificate)
                                      or client.application_uri)
            await client.set_security(POLICIES[sec.policy], str(sec.certificate), str(sec.private_key),
                                      server_certificate=server_certificate, mode=MODES[sec.mode])
        except (OSError, ValueError, TypeError) as exc:
            raise SecurityMismatch(self.device_id, f"cannot load the gateway's certificate or key "
                                                   f"(security.certificate {sec.certificate}, security.private_key "
                                                   f"{sec.private_key}, security.server_certificate "
                                                   f"{sec.server_certificate}): {_describe(exc)}") from exc

    async def _refused(  # noqa: PLR0911 - one return per kind of refusal
        self, trace: _Trace, exc: BaseException, deadline: float,
    ) -> DriverError:
        """The DriverError for a failed connect: what the server refused and what to change, if it can tell.

        When the server failed a secured OpenSecureChannel without a status (it closed the
        connection, sent an error message, or stayed silent), reads the server's endpoints over a
        channel without security, within the connect's time: to tell a pinned certificate that is
        not the server's, or a mode and policy the server does not offer.
        """
        where = f"cannot connect to {self.endpoint}"
        sec = self.security
        status = _status(exc)
        code = status.value if status is not None else None
        named = f" ({status.name})" if status is not None else ""
        if code in _AUTH:
            return AuthRefused(self.device_id, f"{where}: {self._auth_hint(named)}")
        if code in _NO_ENDPOINT and trace.discovery:
            return SecurityMismatch(self.device_id, f"{where}: the server offers no endpoint without security, not "
                                                    f"even to list its endpoints{named}, so the gateway cannot read "
                                                    f"its certificate: set the device's security.server_certificate "
                                                    f"to the PLC's certificate (exported from the PLC)")
        if code in _NO_ENDPOINT and sec.mode == "None":
            return SecurityMismatch(self.device_id, f"{where}: the server refused a connection without security"
                                                    f"{named}, it has no endpoint with security.mode None: "
                                                    f"{_SET_SECURITY}")
        if isinstance(exc, UaError) and "No matching endpoints" in str(exc):
            endpoints = await self._endpoints(deadline)
            return SecurityMismatch(self.device_id, f"{where}: {_no_endpoint(sec.mode, sec.policy, endpoints)}")
        timed_out = isinstance(exc, TimeoutError)
        if sec.mode != "None":
            unanswered = trace.request == "OpenSecureChannel" and trace.fault is None  # no status from the server
            if unanswered or code in _NO_ENDPOINT or "certificate mismatch" in str(exc):
                found = await self._check_endpoints(trace, deadline, timed_out)
                if found is not None:
                    return found
            hint = self._certificate_hint(code, named) if code is not None else None
            if hint is not None:
                return SecurityMismatch(self.device_id, f"{where}: {hint}")
        if timed_out:
            hint = ""
            if sec.mode != "None":  # a server that cannot decrypt our request just stays silent
                hint = f" (security {sec.mode}: is server_certificate the server's certificate?)"
            return DeviceTimeout(self.device_id, f"no session with {self.endpoint} in {self.timeout * 3:g}s{hint}")
        words = f" (the server says: {trace.words!r})" if trace.words else ""
        if sec.mode != "None" and trace.request == "OpenSecureChannel" and trace.words is not None:
            pinned = ""
            if sec.server_certificate is not None:
                pinned = (f", and that security.server_certificate {sec.server_certificate} (SHA-1 "
                          f"{_thumbprint_of(sec.server_certificate)}) is its certificate")
            detail = "; ".join(([status.name] if status is not None else []) + [f"it says: {trace.words!r}"])
            return SecurityMismatch(self.device_id, f"{where}: the server refused the secure channel ({detail}): "
                                                    f"check that it has an endpoint with security.mode {sec.mode} and "
                                                    f"security.policy {sec.policy}{pinned}")
        kind = SecurityMismatch if sec.mode != "None" and _is_security(exc) else DeviceUnreachable
        return kind(self.device_id, f"{where}: {_describe(exc)}{words}")

    def _auth_hint(self, named: str) -> str:
        if not self.username:
            return (f"the server refused an anonymous session{named}: it requires a user name: set the device's "
                    f"username, and its password in {_PASSWORD}")
        if not self.password:
            return (f"the server refused user name {self.username!r} without a password{named}: set the password "
                    f"in {_PASSWORD}")
        return (f"the server refused user name {self.username!r} or its password{named}: check the device's "
                f"username, and the password in {_PASSWORD}")

    def _certificate_hint(self, code: int, named: str) -> str | None:  # noqa: PLR0911 - one return per status
        """What to do about a secured connect the server refused with status ``code``."""
        sec = self.security
        cert = sec.certificate
        assert cert is not None
        mine = f"{cert} (SHA-1 thumbprint {_thumbprint_of(cert)})"
        if code in _UNTRUSTED:
            return (f"the server does not trust the gateway's certificate{named}: trust {mine} on the PLC, in its "
                    f"OPC-UA server's trusted certificates (a server that refused it often keeps it as a rejected "
                    f"certificate, to be moved to the trusted ones); the gateway keeps retrying and connects once it "
                    f"is trusted")
        if code in (ua.StatusCodes.BadCertificateTimeInvalid, ua.StatusCodes.BadCertificateIssuerTimeInvalid):
            return (f"the server says the gateway's certificate {cert} or its issuer is not valid now{named}; "
                    f"{_validity(cert)}: renew it, or check the clocks of the gateway and the PLC")
        if code == ua.StatusCodes.BadCertificateUriInvalid:
            return (f"the server says the application URI the gateway sent is not the one in its certificate{named}: "
                    f"security.application_uri must equal the URI in the subjectAltName of {cert} "
                    f"({_certificate_uri(cert)!r}); leave it unset to use the certificate's")
        if code in (ua.StatusCodes.BadCertificateUseNotAllowed, ua.StatusCodes.BadCertificateIssuerUseNotAllowed):
            return (f"the server does not accept {cert} as an OPC-UA client certificate{named}: it needs the key "
                    f"usages digitalSignature, nonRepudiation, keyEncipherment and dataEncipherment, and the "
                    f"extended key usage clientAuth")
        if code in (ua.StatusCodes.BadCertificateRevoked, ua.StatusCodes.BadCertificateIssuerRevoked):
            return (f"the server says the gateway's certificate {mine} or its issuer is revoked{named}: issue a "
                    f"new certificate and trust it on the PLC")
        if code in (ua.StatusCodes.BadCertificateRevocationUnknown,
                    ua.StatusCodes.BadCertificateIssuerRevocationUnknown):
            return (f"the server cannot tell whether the gateway's certificate {cert} is revoked{named}: give the "
                    f"PLC the revocation list (CRL) of the CA that issued it")
        if code in _NO_ENDPOINT:
            return (f"the server refused security.mode {sec.mode} with security.policy {sec.policy}{named}: set "
                    f"them to one of the endpoints of the PLC's OPC-UA server")
        return None

    async def _check_endpoints(  # noqa: PLR0911 - one return per finding
        self, trace: _Trace, deadline: float, timed_out: bool,
    ) -> DriverError | None:
        """After a secured OpenSecureChannel failed without a status: is the pinned certificate the
        server's, does the server offer the configured mode and policy? None: nothing found."""
        sec = self.security
        where = f"cannot connect to {self.endpoint}"
        pinned = sec.server_certificate
        kind = SecurityTimeout if timed_out else SecurityMismatch
        endpoints = await self._endpoints(deadline)
        if endpoints is None:  # no discovery without security: only the server's own words can tell
            if pinned is not None and trace.words and "decrypt" in trace.words.lower():
                return kind(self.device_id, f"{where}: the server could not decrypt the secure channel request "
                                            f"(it says: {trace.words.strip()!r}): it was encrypted for "
                                            f"security.server_certificate {pinned} (SHA-1 {_thumbprint_of(pinned)}), "
                                            f"which is not the server's certificate. {_PIN} (the server offers no "
                                            f"endpoint without security the gateway could read its certificate from)")
            return None
        endpoint = _endpoint(endpoints, sec.mode, sec.policy)
        if endpoint is None:
            return kind(self.device_id, f"{where}: {_no_endpoint(sec.mode, sec.policy, endpoints)}")
        if pinned is None:
            return None
        theirs = _first_certificate(endpoint.ServerCertificate)
        try:
            ours = _certificate_der(pinned)
        except (OSError, ValueError):
            return None
        if theirs == ours:
            return None
        silent = ("the server did not answer the secure channel request: is server_certificate the server's "
                  "certificate? It is not: ") if timed_out else ""
        return kind(self.device_id, f"{where}: {silent}security.server_certificate {pinned} (SHA-1 "
                                    f"{_thumbprint(ours)}) is not the server's certificate; the server's is SHA-1 "
                                    f"{_thumbprint(theirs)} ({_subject(theirs)}). {_PIN}")

    async def _endpoints(self, deadline: float) -> list[ua.EndpointDescription] | None:
        """The server's endpoints, read over a channel without security; None if it refuses that, or
        there is no time left of the connect."""
        probe = Client(self.endpoint, timeout=self.timeout)
        _traced(probe)
        try:
            async with asyncio.timeout_at(deadline):
                return await probe.connect_and_get_server_endpoints()
        except Exception:  # refused, closed, timed out: the endpoints are unknown
            return None

    async def _setup(self) -> None:
        client = self._client
        assert client is not None
        self._namespaces = await client.get_namespace_array()
        self._resolve()
        self._next_check = time.monotonic()  # the first read reports unresolvable tags at once
        if self.mode == "poll":
            self._limit = self.max_nodes_per_read or await self._server_limit()
            return
        # A new handler per session: a late notification of the old session must not reach this one.
        self._handler = _Handler(self._queue, self._wake)
        self._subscription = await client.create_subscription(self.interval * 1000, self._handler)
        await self._monitor(list(self._node_ids))

    def _resolve(self) -> None:
        self._node_ids.clear()
        self._by_node.clear()
        self._missing.clear()
        for i, t in enumerate(self.tags):
            uri, idx, rest = split_node(t.node)
            if uri is not None:
                if uri not in self._namespaces:
                    self._missing[i] = f"namespace {uri!r} not on the server"
                    continue
                idx = self._namespaces.index(uri)
            try:
                node_id = ua.NodeId.from_string(f"ns={idx};{rest}")
            except (ValueError, UaError) as exc:
                self._missing[i] = f"bad node id {t.node!r}: {exc}"
                continue
            self._node_ids[i] = node_id
            self._by_node.setdefault(node_id, []).append(i)

    async def _server_limit(self) -> int:
        assert self._client is not None
        node = self._client.get_node(ua.ObjectIds.Server_ServerCapabilities_OperationLimits_MaxNodesPerRead)
        try:
            value = await node.read_value()
        except (UaError, ua.UaStatusCodeError):
            return 0
        return int(value or 0)

    async def _monitor(self, indexes: list[int]) -> None:
        """Create monitored items; nodes the server refuses stay in ``_missing`` with the reason."""
        sub = self._subscription
        assert sub is not None and self._client is not None
        groups: dict[float | None, list[int]] = {}
        for i in indexes:
            band = self.tags[i].deadband if self.deadband_type else None
            groups.setdefault(band, []).append(i)
        for band, group in groups.items():
            nodes = [self._client.get_node(self._node_ids[i]) for i in group]
            mfilter = None
            if band is not None:
                mfilter = ua.DataChangeFilter(Trigger=ua.DataChangeTrigger.StatusValue,
                                              DeadbandType=self.deadband_type, DeadbandValue=band)
            # asyncua's _subscribe is the one call that takes both a filter and a sampling interval.
            handles = await sub._subscribe(nodes, ua.AttributeIds.Value, mfilter, self.queue_size,
                                           sampling_interval=self.sampling_ms)
            for i, handle in zip(group, handles, strict=True):
                if isinstance(handle, ua.StatusCode):
                    self._missing[i] = f"{handle.name} for node {self.tags[i].node}"
                else:
                    self._handles[i] = handle
                    self._missing.pop(i, None)

    # -- reading -----------------------------------------------------------------------------
    async def _poll(self) -> list[Reading]:
        assert self._client is not None
        indexes = list(self._node_ids)
        ids = [self._node_ids[i] for i in indexes]
        limit = self._limit or len(ids) or 1
        values: list[ua.DataValue] = []
        for start in range(0, len(ids), limit):
            values += await self._client.uaclient.read_attributes(ids[start : start + limit], ua.AttributeIds.Value)
        now = time.time()
        out = [self._reading(i, dv, now) for i, dv in zip(indexes, values, strict=True)]
        out += [self._missing_reading(i, now) for i in self._missing]
        return out

    async def _drain(self) -> list[Reading]:
        sub = self._subscription
        if sub is not None and sub.is_stale(2.0):
            raise DeviceTimeout(self.device_id, "subscription stopped publishing (no keep-alive)")
        status = self._handler.status
        if status is not None and not status.is_good():
            raise DeviceUnreachable(self.device_id, f"subscription status {status.name}")
        now = time.time()
        out = []
        queue = self._queue
        while queue:
            node_id, dv = queue.popleft()
            out += [self._reading(i, dv, now) for i in self._by_node.get(node_id, ())]
        self._wake.clear()
        return out

    async def _recheck(self) -> list[Reading]:
        """Namespace array unchanged? Nodes still there? Missing ones back? Returns tag changes."""
        assert self._client is not None
        self._next_check = time.monotonic() + self.recheck
        if await self._client.get_namespace_array() != self._namespaces:
            raise DeviceUnreachable(self.device_id, "namespace array changed (server redeployed)")
        now = time.time()
        out: list[Reading] = []
        if self.mode == "subscribe" and self._handles:
            ids = list(self._handles)
            values = await self._client.uaclient.read_attributes([self._node_ids[i] for i in ids],
                                                                 ua.AttributeIds.Value)
            gone = [i for i, dv in zip(ids, values, strict=True)
                    if dv.StatusCode is not None and dv.StatusCode.value == ua.StatusCodes.BadNodeIdUnknown]
            for i in gone:
                handle = self._handles.pop(i)
                self._missing[i] = f"BadNodeIdUnknown for node {self.tags[i].node}"
                out.append(self._missing_reading(i, now))
                try:
                    await self._subscription.unsubscribe(handle)
                except (UaError, ua.UaStatusCodeError):
                    pass  # the server already dropped the item with its node
        retry = [i for i in self._missing if i in self._node_ids and i not in self._handles]
        if self.mode == "subscribe" and retry:
            await self._monitor(retry)
        if self.mode == "subscribe":
            out += [self._missing_reading(i, now) for i in self._missing]
        return out

    def _reject(self, reading: Reading) -> Reading:
        self._rejected.append(reading)
        return reading

    def _missing_reading(self, i: int, now: float) -> Reading:
        t = self.tags[i]
        return Reading(t.asset, t.tag, None, Quality.BAD, self._missing[i], None, now)

    def _reading(self, i: int, dv: ua.DataValue, now: float) -> Reading:
        t = self.tags[i]
        status = dv.StatusCode or ua.StatusCode()
        src = dv.SourceTimestamp.timestamp() if isinstance(dv.SourceTimestamp, datetime) else None
        if status.is_bad():
            return Reading(t.asset, t.tag, None, Quality.BAD, f"{status.name} for node {t.node}", src, now)
        raw = dv.Value.Value if dv.Value is not None else None
        if t.expected is not None and not EXPECTED[t.expected](raw):
            return self._reject(Reading(t.asset, t.tag, None, Quality.BAD,
                                        f"node {t.node} holds {type(raw).__name__}, expected {t.expected}", src, now))
        value, quality, reason = t.transform.apply(_plain(raw))
        if quality is Quality.BAD:  # e.g. NaN or infinite
            return self._reject(Reading(t.asset, t.tag, value, quality, reason, src, now))
        if status.is_uncertain() and quality is Quality.GOOD:
            quality, reason = Quality.UNCERTAIN, status.name
        return Reading(t.asset, t.tag, value, quality, reason, src, now)

    # -- writes ------------------------------------------------------------------------------
    async def write(self, asset: str, tag: str, value: object) -> object:
        """Set ``asset``/``tag`` to the engineering ``value``; return the value it held before.

        One Read of the node's Value and DataType, one Write with the node's own VariantType (an
        Int32 node gets an Int32, a Float node a Float), one Read back. Raises WriteRefused for a tag
        this driver does not have (before any request) and EncodeError for a value the node's type
        cannot hold (before the write; both ValueError). DeviceUnreachable and DeviceTimeout as read()
        does (after a timeout the write may or may not have been applied), DeviceException when the
        node is missing or the server refuses the write (e.g. BadNotWritable), WriteNotApplied when
        the value read back is not the one written. Writes of one driver run one at a time.
        """
        index = next((i for i, t in enumerate(self.tags) if t.asset == asset and t.tag == tag), None)
        if index is None:
            raise WriteRefused(f"{self.device_id}: no tag {asset}/{tag} on this device")
        async with self._writing:
            client = self._client
            if client is None:
                raise DeviceUnreachable(self.device_id, "not connected")
            if self._lost is not None:
                raise DeviceUnreachable(self.device_id, f"session lost: {self._lost}")
            node_id = self._node_ids.get(index)
            if node_id is None:
                reason = self._missing.get(index, f"node {self.tags[index].node} not resolved")
                raise DeviceException(self.device_id, f"{asset}/{tag}: {reason}")
            try:
                async with asyncio.timeout(self.timeout * 3):
                    return await self._write_node(client, self.tags[index], node_id, value)
            except TimeoutError:
                raise DeviceTimeout(self.device_id, f"no answer from {self.endpoint} in {self.timeout * 3:g}s to "
                                                    f"a write of {asset}/{tag}; it may or may not have been applied"
                                    ) from None
            except (OSError, UaError, ua.UaStatusCodeError, ConnectionError) as exc:
                raise DeviceUnreachable(self.device_id, _describe(exc)) from exc

    async def _write_node(self, client: Client, spec: OpcTagSpec, node_id: ua.NodeId, value: object) -> object:
        where = f"{spec.asset}/{spec.tag} (node {spec.node})"
        params = ua.ReadParameters()
        for attribute in (ua.AttributeIds.Value, ua.AttributeIds.DataType):
            params.NodesToRead.append(ua.ReadValueId(NodeId=node_id, AttributeId=attribute))
        current, dtype = self._results(await client.uaclient.read(params), 2, where)
        if dtype.StatusCode is not None and dtype.StatusCode.is_bad():  # e.g. BadNodeIdUnknown
            raise DeviceException(self.device_id, f"{where}: {dtype.StatusCode.name}")
        vtype = await _variant_type(client, dtype.Value.Value if dtype.Value is not None else None, current)
        variant = encode_variant(value, spec.transform, vtype)
        old = None  # a Bad value (a failed sensor) was no value: the audit trail shows null
        good = current.StatusCode is None or not current.StatusCode.is_bad()
        if good and current.Value is not None and current.Value.Value is not None:
            old = spec.transform.apply(_plain(current.Value.Value))[0]
        (status,) = self._results(
            await client.uaclient.write_attributes([node_id], [ua.DataValue(variant)], ua.AttributeIds.Value), 1, where)
        if not status.is_good():
            raise DeviceException(self.device_id, f"{where}: the server refused the write: {status.name}")
        (back,) = self._results(await client.uaclient.read_attributes([node_id], ua.AttributeIds.Value), 1, where)
        held = back.Value.Value if back.Value is not None else None
        if not _same(held, variant.Value) or (back.StatusCode is not None and back.StatusCode.is_bad()):
            shown = spec.transform.apply(_plain(held))[0]
            raise WriteNotApplied(self.device_id, f"{where}: wrote {value!r}, the server holds {shown!r}")
        return old

    def _results(self, results: list[Any], want: int, where: str) -> list[Any]:
        if len(results) != want:
            raise BadReply(self.device_id, f"{where}: {len(results)} results to a request for {want}")
        return results


OPC_INT_RANGES: dict[ua.VariantType, tuple[int, int]] = {
    ua.VariantType.SByte: (-(1 << 7), (1 << 7) - 1),
    ua.VariantType.Byte: (0, (1 << 8) - 1),
    ua.VariantType.Int16: (-(1 << 15), (1 << 15) - 1),
    ua.VariantType.UInt16: (0, (1 << 16) - 1),
    ua.VariantType.Int32: (-(1 << 31), (1 << 31) - 1),
    ua.VariantType.UInt32: (0, (1 << 32) - 1),
    ua.VariantType.Int64: (-(1 << 63), (1 << 63) - 1),
    ua.VariantType.UInt64: (0, (1 << 64) - 1),
}
_ABSTRACT_TYPES = {24, 26, 27, 28}  # BaseDataType, Number, Integer, UInteger: the value says which


def encode_variant(value: object, transform: Transform, vtype: ua.VariantType) -> ua.Variant:
    """Pure: the Variant of ``vtype`` that reads back (through ``transform``) as ``value``.

    Raises EncodeError (a ValueError) for a value of the wrong kind, out of the type's range, not
    finite, or a node type this driver does not write (only Boolean, integers, Float, Double, String).
    """
    if vtype is ua.VariantType.Boolean:
        kind: Kind = "bool"
    elif vtype in OPC_INT_RANGES:
        kind = "int"
    elif vtype in (ua.VariantType.Float, ua.VariantType.Double):
        kind = "float"
    elif vtype is ua.VariantType.String:
        kind = "string"
    else:
        raise EncodeError(f"cannot write a node of type {vtype.name}")
    raw = to_raw(value, transform, kind)
    if kind == "int":
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise EncodeError(f"a {vtype.name} node needs a number, got {raw!r}")
        check_int_range(raw, *OPC_INT_RANGES[vtype], vtype.name, transform)
    elif kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise EncodeError(f"a {vtype.name} node needs a number, got {raw!r}")
        raw = float(raw)
        if vtype is ua.VariantType.Float:
            try:
                raw = struct.unpack(">f", struct.pack(">f", raw))[0]
            except OverflowError:
                raise EncodeError(f"{value!r} is out of range for Float (float32)") from None
    elif type(raw) is not (bool if kind == "bool" else str):
        raise EncodeError(f"a {vtype.name} node cannot hold {raw!r}")
    return ua.Variant(raw, vtype)


async def _variant_type(client: Client, dtype: object, current: ua.DataValue) -> ua.VariantType:
    """The VariantType values of a node with DataType ``dtype`` are written with."""
    held = current.Value.VariantType if current.Value is not None and current.Value.Value is not None else None
    if not isinstance(dtype, ua.NodeId):
        if held is None:
            raise EncodeError("the node has neither a DataType nor a value to take the type from")
        return held
    if dtype.NamespaceIndex == 0 and isinstance(dtype.Identifier, int):
        if 1 <= dtype.Identifier <= 21:
            return ua.VariantType(dtype.Identifier)
        if dtype.Identifier == 29:  # Enumeration: Int32 on the wire
            return ua.VariantType.Int32
    if not (dtype.NamespaceIndex == 0 and dtype.Identifier in _ABSTRACT_TYPES):
        vtype = await data_type_to_variant_type(client.get_node(dtype))  # a subtype: walk to its base
        if vtype is not ua.VariantType.Variant:
            return vtype
    if held is None:
        raise EncodeError(f"the node's DataType {dtype} is abstract and it holds no value to take the type from")
    return held


def _same(held: object, written: object) -> bool:
    """The value read back is the one written (same Python type: True is not 1)."""
    return type(held) is type(written) and held == written


def _plain(value: object) -> object:
    """A JSON-friendly value: numbers, bools, strings and lists stay; anything else is its text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if not isinstance(exc, (OSError, UaError, ua.UaStatusCodeError, TimeoutError)) and exc.__traceback__:
        frame = traceback.extract_tb(exc.__traceback__)[-1]  # where a library tripped (an assert, a parser)
        text += f" (at {Path(frame.filename).name}:{frame.lineno})"
    return text


# -- why a connect failed -------------------------------------------------------------------------

_PASSWORD = "EDGE_GATEWAY_OPCUA_PASSWORD or, when that is not set, the device's password_file"
_SET_SECURITY = ("set the device's security (mode, policy, certificate, private_key, and server_certificate to pin "
                 "the PLC's certificate) to one of the PLC's endpoints")
_PIN = "Pin the server's own certificate: export it from the PLC and set security.server_certificate to it"
_AUTH = frozenset({ua.StatusCodes.BadUserAccessDenied, ua.StatusCodes.BadIdentityTokenInvalid,
                   ua.StatusCodes.BadIdentityTokenRejected, ua.StatusCodes.BadUserSignatureInvalid})
_NO_ENDPOINT = frozenset({ua.StatusCodes.BadSecurityPolicyRejected, ua.StatusCodes.BadSecurityModeRejected})
_UNTRUSTED = frozenset({  # the server has not (yet) trusted the gateway's certificate, or its chain
    ua.StatusCodes.BadSecurityChecksFailed, ua.StatusCodes.BadCertificateUntrusted,
    ua.StatusCodes.BadCertificateInvalid, ua.StatusCodes.BadCertificateChainIncomplete,
    ua.StatusCodes.BadCertificatePolicyCheckFailed, ua.StatusCodes.BadNoValidCertificates,
})


@dataclass
class _Trace:
    """What the transport saw during one connect, for the message of a failure."""

    request: str | None = None  # the last request sent: OpenSecureChannel, CreateSession, ActivateSession, ...
    fault: ua.StatusCode | None = None  # the ServiceFault that answered an OpenSecureChannel
    words: str | None = None  # the server's own text: an ERR message's reason, a fault's string table
    discovery: bool = False  # set by the driver while it reads the endpoints to find the server's certificate


class _SocketProtocol(UASocketProtocol):
    """asyncua's transport, with a refused OpenSecureChannel reported as the server's status.

    A server refuses an OpenSecureChannel (an untrusted client certificate, a security policy it
    does not offer, a request encrypted for another certificate) with a ServiceFault in place of
    the OpenSecureChannelResponse (OPC 10000-6, 6.7.4; node-opcua and PLCs do). asyncua 2.1.0
    resolves the pending request with the fault's body before it parses the body as an
    OpenSecureChannelResponse; the parse fails, and ``open_secure_channel`` then fails on
    ``assert isinstance(self._open_secure_channel_exchange, ua.OpenSecureChannelResponse)``: an
    AssertionError without the status leaves ``Client.connect``. Here the fault fails the request
    with its status (a UaStatusCodeError such as BadSecurityChecksFailed), as any other
    ServiceFault does, and the socket is closed. ``trace`` records what a message needs.
    """

    trace: _Trace

    def _send_request(self, request: Any, timeout: float = 1,
                      message_type: ua.MessageType = ua.MessageType.SecureMessage,  # type: ignore[assignment]
                      ) -> asyncio.Future[Any]:
        self.trace.request = type(request).__name__.removesuffix("Request")
        return super()._send_request(request, timeout, message_type)

    def _process_received_message(self, msg: Any) -> None:
        if isinstance(msg, ua.ErrorMessage):
            self.trace.words = msg.Reason or None
        elif isinstance(msg, ua.Message):
            reply: Any = msg  # asyncua's Message has no annotations
            if isinstance(reply.SecurityHeader(), ua.AsymmetricAlgorithmHeader):  # an OpenSecureChannel reply
                fault = _service_fault(reply.body())
                if fault is not None:
                    self.trace.fault, self.trace.words = fault
                    # asyncua's _process_received_data fails the pending requests with it, closes the socket
                    raise ua.UaStatusCodeError(fault[0].value)
        super()._process_received_message(msg)


def _traced(client: Client) -> _Trace:
    """Make ``client``'s transports _SocketProtocols; returns the trace they share."""
    trace = _Trace()
    uaclient = client.uaclient
    make = uaclient._make_protocol

    def make_protocol() -> UASocketProtocol:
        protocol = make()
        protocol.__class__ = _SocketProtocol  # the subclass adds behaviour, and no state but the trace
        protocol.trace = trace  # type: ignore[attr-defined]
        return protocol

    uaclient._make_protocol = make_protocol  # type: ignore[method-assign]
    return trace


def _service_fault(body: Any) -> tuple[ua.StatusCode, str | None] | None:
    """The status (and text) of a ServiceFault, None for any other message body."""
    try:
        fault_id = ua.FourByteNodeId(ua.ObjectIds.ServiceFault_Encoding_DefaultBinary)  # type: ignore[arg-type]
        if nodeid_from_binary(body) != fault_id:
            return None
        header = struct_from_binary(ua.ResponseHeader, body)
    except Exception:  # not a ServiceFault asyncua can read: leave it to asyncua
        return None
    words = "; ".join(t for t in header.StringTable or () if t) or None
    return header.ServiceResult, words


def _is_security(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return any(k in text for k in ("Security", "Certificate", "certificate", "No matching"))


def _status(exc: BaseException) -> ua.StatusCode | None:
    """The OPC-UA status of a failure: of ``exc`` or of an exception it was raised from."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, ua.UaStatusCodeError):
            return ua.StatusCode(seen.code)
        seen = seen.__cause__ or seen.__context__
    return None


_POLICY_NAMES = {cls.URI: name for name, cls in POLICIES.items()}


def _endpoint(endpoints: Sequence[ua.EndpointDescription], mode: str, policy: str) -> ua.EndpointDescription | None:
    want_mode = ua.MessageSecurityMode.None_ if mode == "None" else MODES[mode]
    want_uri = security_policies.SecurityPolicyNone.URI if mode == "None" else POLICIES[policy].URI
    return next((ep for ep in endpoints if ep.SecurityMode == want_mode and ep.SecurityPolicyUri == want_uri), None)


def _offers(endpoints: Sequence[ua.EndpointDescription]) -> str:
    """``SignAndEncrypt/Basic256Sha256, None``: the modes and policies of the endpoints."""
    seen: dict[str, None] = {}
    for ep in endpoints:
        mode = ua.MessageSecurityMode(ep.SecurityMode).name.rstrip("_")
        if mode == "None":
            seen["None"] = None
        else:
            uri = ep.SecurityPolicyUri or ""
            seen[f"{mode}/{_POLICY_NAMES.get(uri, uri.rpartition('#')[2])}"] = None
    return ", ".join(seen) or "no endpoints"


def _no_endpoint(mode: str, policy: str, endpoints: Sequence[ua.EndpointDescription] | None) -> str:
    offers = f"it offers {_offers(endpoints)}" if endpoints is not None else "it does not list its endpoints"
    if mode == "None":
        return f"the server has no endpoint without security (security.mode None); {offers}: {_SET_SECURITY}"
    return (f"the server has no endpoint with security.mode {mode} and security.policy {policy}; {offers}: set the "
            f"device's security.mode and security.policy to one of these")


def _first_certificate(data: bytes) -> bytes:
    """The first certificate of a DER chain (servers may send their chain as one byte string)."""
    if len(data) > 4 and data[0] == 0x30 and data[1] & 0x80:  # SEQUENCE, length in the next bytes
        size = data[1] & 0x7F
        return data[: 2 + size + int.from_bytes(data[2 : 2 + size], "big")]
    return data


def _certificate_der(path: Path) -> bytes:
    """The DER bytes of the certificate in ``path`` (DER or PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    data = path.read_bytes()
    if b"-----BEGIN" in data:
        return x509.load_pem_x509_certificate(data).public_bytes(Encoding.DER)
    return data


def _thumbprint(der: bytes) -> str:
    """The SHA-1 thumbprint OPC-UA servers show and name their certificate files by (40 hex digits)."""
    return hashlib.sha1(der, usedforsecurity=False).hexdigest()


def _thumbprint_of(path: Path) -> str:
    try:
        return _thumbprint(_certificate_der(path))
    except (OSError, ValueError) as exc:
        return f"unknown: cannot read it: {exc}"


def _subject(der: bytes) -> str:
    from cryptography import x509

    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string() or "no subject"
    except ValueError:
        return "not a readable certificate"


def _validity(path: Path) -> str:
    from cryptography import x509

    try:
        cert = x509.load_der_x509_certificate(_certificate_der(path))
    except (OSError, ValueError):
        return "its validity cannot be read"
    return (f"it is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def _certificate_uri(path: Path) -> str | None:
    """The URI in the certificate's subjectAltName: asyncua requires application_uri to match it."""
    from cryptography import x509

    data = path.read_bytes()
    cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


async def _quiet_disconnect(client: Client) -> None:
    try:
        async with asyncio.timeout(2):
            await client.disconnect()
    except Exception:  # noqa: BLE001 - a dead session cannot be closed politely; the socket goes anyway
        try:
            client.disconnect_socket()
        except Exception:  # noqa: BLE001
            pass
