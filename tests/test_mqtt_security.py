"""Broker security against a real Mosquitto: TLS with server verification, client certificates and
passwords. Every failure is a clear error in ``last_error`` and health, the gateway keeps retrying,
nothing goes out in plain text, and the buffer keeps every reading until the broker accepts it."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives import serialization

from gateway.app import Gateway
from gateway.brokers import BrokerTls, Mosquitto, free_port
from gateway.demo import with_endpoints
from gateway.tagmap import MqttTls, SourceError, TagMap, load_tag_map_text
from simulators.stations import Station

from .certs import Pki, make_pki
from .conftest import stations_only
from .helpers import Collector, check_delivery, collecting, running, total, tune, wait_until

pytestmark = pytest.mark.integration

GATEWAY_USER, GATEWAY_PASSWORD = "edge-01", "edge-01-pass"
CENTRAL_USER, CENTRAL_PASSWORD = "central", "central-pass"


def acl(prefix: str, gateway_id: str) -> str:
    """The ACL of README's "Broker security": only the central service commands gateways; a gateway
    publishes under its own topics and reads only its own commands."""
    return (f"user {CENTRAL_USER}\n"
            f"topic read {prefix}/#\n"
            f"topic write {prefix}/gateways/+/cmd/#\n"
            "\n"
            f"user {gateway_id}\n"
            f"topic write {prefix}/gateways/{gateway_id}/status\n"
            f"topic read {prefix}/gateways/{gateway_id}/cmd/#\n"
            f"topic write {prefix}/gateways/{gateway_id}/cmd/reply\n"
            f"topic write {prefix}/stations/#\n"
            f"topic write {prefix}/reactors/#\n")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextlib.contextmanager
def broker(tmp_path: Path, pki: Pki, *, require_certificate: bool = False,
           gateway_password: str = GATEWAY_PASSWORD) -> Iterator[Mosquitto]:
    """Mosquitto with a plain and a TLS listener, passwords on both, and the README's ACL."""
    workdir = tmp_path / "mosquitto"
    workdir.mkdir()
    acl_file = workdir / "acl"
    acl_file.write_text(acl("ninu/plant-1", GATEWAY_USER))
    tls = BrokerTls(cafile=pki.ca, certfile=pki.server_cert, keyfile=pki.server_key,
                    require_certificate=require_certificate)
    users = {GATEWAY_USER: gateway_password, CENTRAL_USER: CENTRAL_PASSWORD}
    with Mosquitto(workdir=workdir, tls=tls, users=users, acl_file=acl_file) as mosquitto:
        yield mosquitto


def central_tls(pki: Pki) -> ssl.SSLContext:
    """The central service's view: it trusts the same CA (and has a client certificate)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


def gateway_map(plant_map: TagMap, stations: dict[str, Station], *, port: int, tls: MqttTls | None,
                **mqtt: Any) -> TagMap:
    tm = tune(with_endpoints(stations_only(plant_map), stations=stations), interval=0.1, reconnect_max=0.5)
    update = {"host": "127.0.0.1", "port": port, "tls": tls, "username": GATEWAY_USER, **mqtt}
    return tm.model_copy(update={"mqtt": tm.mqtt.model_copy(update=update)})


def broker_health(gw: Gateway) -> dict[str, Any]:
    state = gw.health()[1]["broker"]
    assert isinstance(state, dict)
    return state


def sequenced(messages: list[Any]) -> list[int]:
    """The seq of every telemetry, alert and event message received (one sequence for the three)."""
    return [int(m.data["seq"]) for m in messages if "seq" in m.data]


# -- the tag map -------------------------------------------------------------------------------------

MAP = """\
gateway: {id: edge-01}
mqtt:
  host: 10.0.0.5
  topic_prefix: ninu/plant-1
  username: edge-01
  tls:
%s
devices:
  - {id: plc, protocol: modbus_tcp, host: 127.0.0.1}
assets:
  - id: filler-1
    kind: station
    tags:
      units: {device: plc, table: holding, address: 0}
"""


def tls_map(**keys: object) -> str:
    return MAP % "\n".join(f"    {k}: {v}" for k, v in keys.items())


def test_tls_section_loads(pki: Pki) -> None:
    tm = load_tag_map_text(tls_map(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key,
                                   server_name="broker.plant-1.local", min_version=1.3), "edge.yaml")
    assert tm.mqtt.tls == MqttTls(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key,
                                  server_name="broker.plant-1.local", min_version="1.3")
    assert tm.mqtt.port == 8883, "the MQTT over TLS port unless one is given"
    plain = load_tag_map_text(MAP.replace("  tls:\n%s\n", ""), "edge.yaml")
    assert plain.mqtt.tls is None and plain.mqtt.port == 1883


def test_tls_file_errors_name_file_line_and_field(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted-key.pem"
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"pass")))
    missing = tmp_path / "missing-ca.pem"
    cases: list[tuple[dict[str, object], str, str]] = [
        (dict(ca_file=missing), "mqtt.tls.ca_file", f"{missing}: cannot read it: No such file or directory"),
        (dict(ca_file=tmp_path), "mqtt.tls.ca_file", f"{tmp_path}: is a directory, not a PEM file"),
        (dict(ca_file=garbage), "mqtt.tls.ca_file", f"{garbage}: no usable PEM CA certificate in it"),
        (dict(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.server_key), "mqtt.tls.key_file",
         f"{pki.server_key}: this key does not belong to the certificate {pki.client_cert}"),
        (dict(ca_file=pki.ca, cert_file=pki.client_cert, key_file=encrypted), "mqtt.tls.key_file",
         f"{encrypted}: the private key is encrypted"),
        (dict(ca_file=pki.ca, cert_file=garbage, key_file=pki.client_key), "mqtt.tls.cert_file",
         f"{garbage}: not a PEM certificate with its private key"),
        (dict(ca_file=pki.ca, key_file=pki.client_key), "mqtt.tls", "key_file needs cert_file"),
        (dict(ca_file=pki.ca, min_version=1.1), "mqtt.tls.min_version", "Input should be '1.2' or '1.3'"),
        (dict(ca_file=pki.ca, insecure="true"), "mqtt.tls.insecure", "unknown key"),
    ]
    for keys, field, message in cases:
        text = tls_map(**keys)
        leaf = field.rsplit(".", 1)[-1]
        line = 1 + next(i for i, t in enumerate(text.splitlines()) if t.strip().startswith(f"{leaf}:"))
        with pytest.raises(SourceError) as err:
            load_tag_map_text(text, "edge.yaml")
        assert str(err.value).startswith(f"edge.yaml:{line}: {field}: {message}"), (keys, str(err.value))
        print(err.value)
    no_password = tmp_path / "mqtt.pass"
    text = tls_map(ca_file=pki.ca).replace("  username: edge-01\n",
                                           f"  username: edge-01\n  password_file: {no_password}\n")
    with pytest.raises(SourceError) as err:
        load_tag_map_text(text, "edge.yaml")
    assert str(err.value) == (f"edge.yaml:6: mqtt.password_file: {no_password}: "
                              "cannot read it: No such file or directory")


# -- against a real broker ---------------------------------------------------------------------------

async def command_round_trip(port: int, tls: ssl.SSLContext, gateway_topic: str, sub: Collector) -> dict[str, Any]:
    """The central service sends a command (one the gateway refuses); the gateway's reply comes back.
    Both pass the ACL: the command is the central service's to send, the reply the gateway's."""
    async with aiomqtt.Client("127.0.0.1", port, tls_context=tls, username=CENTRAL_USER,
                              password=CENTRAL_PASSWORD) as central:
        for _ in range(10):  # the gateway subscribes right after connecting: send again until answered
            await central.publish(f"{gateway_topic}/cmd/no-such-command", b'{"request_id": "sec-1"}', qos=1)
            with contextlib.suppress(AssertionError):
                await wait_until(lambda: bool(sub.leaf("reply")), 1, "a reply")
                return dict(sub.leaf("reply")[0].data)
    raise AssertionError("no reply to a command sent by the central service")


async def gateway_may_not_command(port: int, ca: Path, prefix: str, sub: Collector) -> None:
    """With the gateway's credentials a command is refused by the ACL (Mosquitto 2.0 then closes that
    connection). A message sent afterwards arrives, so the command would have arrived before it."""
    ctx = ssl.create_default_context(cafile=str(ca))

    def client() -> aiomqtt.Client:
        return aiomqtt.Client("127.0.0.1", port, tls_context=ctx, username=GATEWAY_USER, password=GATEWAY_PASSWORD)

    with contextlib.suppress(aiomqtt.MqttError):
        async with client() as spoof:
            await spoof.publish(f"{prefix}/gateways/edge-01/cmd/acknowledge", b'{"request_id": "spoofed"}', qos=1)
    async with client() as probe:
        await probe.publish(f"{prefix}/stations/acl-probe/events", b'{"probe": true}', qos=1)
    await wait_until(lambda: any(m.topic.endswith("/acl-probe/events") for m in sub.messages), 5, "the probe")
    assert not [m for m in sub.messages if m.topic.endswith("/cmd/acknowledge")], "the ACL let a gateway command"


async def test_tls_and_password_end_to_end(
    pki: Pki, plant_map: TagMap, stations: dict[str, Station], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The password from EDGE_GATEWAY_MQTT_PASSWORD, TLS verified against the CA; a subscriber that
    trusts the same CA gets telemetry; README's ACL lets status, telemetry and command replies through,
    and commands only from the central service."""
    monkeypatch.setenv("EDGE_GATEWAY_MQTT_PASSWORD", GATEWAY_PASSWORD)
    with broker(tmp_path, pki) as mosquitto:
        assert mosquitto.tls_port is not None
        tm = gateway_map(plant_map, stations, port=mosquitto.tls_port, tls=MqttTls(ca_file=pki.ca))
        prefix = tm.mqtt.topic_prefix
        async with collecting(mosquitto.tls_port, f"{prefix}/#", tls_context=central_tls(pki),
                              username=CENTRAL_USER, password=CENTRAL_PASSWORD) as sub, \
                running(tm, tmp_path / "b.sqlite") as gw:
            assert gw.publisher is not None
            await wait_until(lambda: {m.data.get("asset_id") for m in sub.leaf("telemetry")}
                             >= {a.id for a in tm.assets}, 15, "telemetry of every station over TLS")
            assert gw.publisher.connected and gw.publisher.last_error is None
            assert broker_health(gw) == {"connected": True, "last_error": None}
            assert [m.data["state"] for m in sub.leaf("status")][:1] == ["online"], "status passed the ACL"
            reply = await command_round_trip(mosquitto.tls_port, central_tls(pki), f"{prefix}/gateways/edge-01", sub)
            assert reply["request_id"] == "sec-1" and reply["ok"] is False, reply
            await gateway_may_not_command(mosquitto.tls_port, pki.ca, prefix, sub)
    seqs = sequenced(sub.messages)
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    print(f"TLS + password: {len(seqs)} sequenced messages, seq {seqs[0]}..{seqs[-1]}; command reply {reply}")


async def test_client_certificate_required_and_given(
    pki: Pki, plant_map: TagMap, stations: dict[str, Station], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_GATEWAY_MQTT_PASSWORD", GATEWAY_PASSWORD)
    with broker(tmp_path, pki, require_certificate=True) as mosquitto:
        assert mosquitto.tls_port is not None
        tls = MqttTls(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key, server_name="localhost")
        tm = gateway_map(plant_map, stations, port=mosquitto.tls_port, tls=tls)
        async with collecting(mosquitto.tls_port, f"{tm.mqtt.topic_prefix}/+/+/telemetry",
                              tls_context=central_tls(pki), username=CENTRAL_USER, password=CENTRAL_PASSWORD) as sub, \
                running(tm, tmp_path / "b.sqlite") as gw:
            await wait_until(lambda: len(sub.messages) >= 20, 15, "telemetry with a client certificate")
            assert gw.publisher is not None and gw.publisher.last_error is None


# (what is configured, which port, what the error must say)
FAILURES = {
    "unknown_ca": (dict(ca_file="rogue_ca"), "tls", False,
                   "TLS: broker certificate not trusted: the broker's certificate is not signed by a CA in "
                   "mqtt.tls.ca_file"),
    "wrong_hostname": (dict(ca_file="ca", server_name="broker.example"), "tls", False,
                       "TLS: the broker's certificate does not name the host connected to"),
    "plain_port": (dict(ca_file="ca"), "plain", False, "(a plain MQTT port?)"),
    "refused": (dict(ca_file="ca"), "closed", False, "connection refused: nothing listens on the broker's port"),
    "client_cert_missing": (dict(ca_file="ca"), "tls", True,
                            "TLS: the broker requires a client certificate (mqtt.tls.cert_file)"),
    "client_cert_unknown_ca": (dict(ca_file="ca", cert_file="rogue_client_cert", key_file="rogue_client_key"),
                               "tls", True, "TLS: the broker does not trust the CA of the client certificate"),
    "ca_file_gone": (dict(ca_file="gone"), "tls", False, "mqtt.tls.ca_file: "),
}


@pytest.mark.parametrize("case", list(FAILURES))
async def test_tls_failure_is_clear_and_loses_nothing(  # noqa: PLR0917
    case: str, pki: Pki, plant_map: TagMap, stations: dict[str, Station], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused TLS connection: a readable last_error (also in health), retries, no plain-text
    fallback (a subscriber on the plain port sees nothing), and every reading stays buffered."""
    monkeypatch.setenv("EDGE_GATEWAY_MQTT_PASSWORD", GATEWAY_PASSWORD)
    keys, port_kind, require_certificate, expected = FAILURES[case]
    files = {**{k: getattr(pki, k) for k in ("ca", "rogue_ca", "rogue_client_cert", "rogue_client_key")},
             "gone": tmp_path / "not-there-any-more.pem"}
    fields: dict[str, Any] = {k: files[v] if k.endswith("_file") else v for k, v in keys.items()}
    tls = MqttTls.model_construct(**fields)  # unchecked, as if a file went away after the map was loaded
    with broker(tmp_path, pki, require_certificate=require_certificate) as mosquitto:
        port = {"tls": mosquitto.tls_port, "plain": mosquitto.port, "closed": free_port()}[port_kind]
        assert port is not None
        tm = gateway_map(plant_map, stations, port=port, tls=tls, publish_timeout=1.0)
        async with collecting(mosquitto.port, f"{tm.mqtt.topic_prefix}/#",
                              username=CENTRAL_USER, password=CENTRAL_PASSWORD) as plain_sub, \
                running(tm, tmp_path / "b.sqlite") as gw:
            pub = gw.publisher
            assert pub is not None
            await wait_until(lambda: pub.last_error is not None and expected in pub.last_error, 10,
                             f"the error {expected!r} (last: {pub.last_error!r})")
            reconnects = gw.metrics.reconnects._value.get()
            await wait_until(lambda: gw.metrics.reconnects._value.get() >= reconnects + 2 and pub.buffer.rows >= 30,
                             10, "two more attempts while readings pile up")
            assert not pub.connected
            ok, health = gw.health()
            assert ok and health["status"] == "degraded"
            assert health["broker"] == {"connected": False, "last_error": pub.last_error}
            seqs = [r.seq for r in await pub.buffer.fetch(0, 1_000_000)]
            assert seqs == list(range(1, len(seqs) + 1)), "every reading is in the buffer, none was sent"
        assert plain_sub.messages == [], "nothing reached the broker, in particular not in plain text"
    print(f"{case}: {pub.last_error}")


async def test_wrong_password_buffers_then_delivers_everything_in_order(
    pki: Pki, plant_map: TagMap, stations: dict[str, Station], tmp_path: Path
) -> None:
    """The broker has an old password for the gateway: "not authorized", readings pile up; the
    broker's password file is fixed and reloaded (SIGHUP): every buffered reading arrives, in order."""
    password_file = tmp_path / "mqtt.pass"
    password_file.write_text(GATEWAY_PASSWORD + "\n")
    with broker(tmp_path, pki, gateway_password="the-old-password") as mosquitto:
        assert mosquitto.tls_port is not None
        tm = gateway_map(plant_map, stations, port=mosquitto.tls_port, tls=MqttTls(ca_file=pki.ca),
                         password_file=password_file)
        prefix = tm.mqtt.topic_prefix
        async with collecting(mosquitto.tls_port, f"{prefix}/+/+/+", tls_context=central_tls(pki),
                              username=CENTRAL_USER, password=CENTRAL_PASSWORD) as sub, \
                running(tm, tmp_path / "b.sqlite") as gw:
            pub = gw.publisher
            assert pub is not None
            await wait_until(lambda: pub.last_error is not None and "not authorized" in pub.last_error, 10,
                             f"'not authorized' (last: {pub.last_error!r})")
            await wait_until(lambda: pub.buffer.rows >= 100, 10, "readings piling up in the buffer")
            assert broker_health(gw) == {"connected": False, "last_error": pub.last_error}
            assert sequenced(sub.messages) == []
            error = pub.last_error
            last_seq = pub.buffer.next_seq - 1  # buffered while refused
            mosquitto.set_passwords({GATEWAY_USER: GATEWAY_PASSWORD, CENTRAL_USER: CENTRAL_PASSWORD})
            mosquitto.reload()
            await wait_until(lambda: pub.connected, 10, "the gateway to log in after the fix")
            await wait_until(lambda: set(range(1, last_seq + 1)) <= set(sequenced(sub.messages)), 15,
                             f"every seq up to {last_seq}")
            assert pub.last_error is None and broker_health(gw)["connected"] is True
        assert total(gw.metrics.drops) == 0
    sent = int(gw.metrics.publishes.labels("telemetry")._value.get())
    seqs = sequenced(sub.messages)
    unique = sorted(set(seqs))
    _, dupes = check_delivery([m for m in sub.messages if "seq" in m.data], 1, unique[-1])  # no gap, in order
    assert dupes <= tm.mqtt.max_inflight
    print(f"wrong password: {error}")
    assert len(unique) >= sent >= last_seq
    print(f"password fixed: {last_seq} buffered while refused; sent {sent}, received {len(seqs)} "
          f"({len(unique)} unique, seq 1..{unique[-1]}), {dupes} duplicates")
