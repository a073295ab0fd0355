"""Broker security: the TLS context of the MQTT connection, and readable reasons for a refused connect.

``client_context`` builds the ``ssl.SSLContext`` from the tag map's ``mqtt.tls`` once: it always
verifies the broker's certificate chain and host name (there is no switch to turn that off), and
every problem with a file is a ``TlsFileError`` naming the field and the file. ``reason`` turns
what the MQTT client raised into one line an operator can act on.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tagmap import MqttTls

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsFileError(ValueError):
    """A file of ``mqtt.tls`` is missing, unreadable or not what it should be."""

    def __init__(self, field: str, path: Path | None, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path is not None else problem)
        self.field = field
        self.path = path


class _Context(ssl.SSLContext):
    """Verifies the broker against ``server_name`` instead of the host it connects to (and sends
    it as SNI): for a broker reached by an IP address its certificate does not list."""

    server_name: str | None = None

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,  # noqa: PLR0917
                    suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return super().wrap_socket(sock, server_side, do_handshake_on_connect, suppress_ragged_eofs,
                                   self.server_name or server_hostname, session)


def _readable(field: str, path: Path) -> None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except IsADirectoryError:
        raise TlsFileError(field, path, "is a directory, not a PEM file") from None
    except OSError as exc:
        raise TlsFileError(field, path, f"cannot read it: {exc.strerror or exc}") from None


def _encrypted_key() -> str:
    raise TlsFileError("key_file", None, "the private key is encrypted; the gateway needs it unencrypted "
                       "(keep it readable by the gateway only, mode 0600)")


def client_context(tls: MqttTls) -> ssl.SSLContext:
    """The context for every connection to the broker; raises ``TlsFileError``."""
    ctx = _Context(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname: always on
    ctx.minimum_version = _VERSIONS[tls.min_version]
    if tls.ca_file is not None:
        _readable("ca_file", tls.ca_file)
        try:
            ctx.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, ValueError) as exc:
            raise TlsFileError("ca_file", tls.ca_file, f"no usable PEM CA certificate in it ({_short(exc)})") from None
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if tls.cert_file is not None:
        key = tls.key_file or tls.cert_file
        _readable("cert_file", tls.cert_file)
        _readable("key_file", key)
        try:
            ctx.load_cert_chain(tls.cert_file, key, password=_encrypted_key)
        except TlsFileError as exc:
            raise TlsFileError("key_file", key, str(exc)) from None
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise TlsFileError("key_file", key, f"this key does not belong to the certificate {tls.cert_file}") \
                    from None
            raise TlsFileError("cert_file", tls.cert_file,
                               f"not a PEM certificate with its private key in {key} ({_short(exc)})") from None
    ctx.server_name = tls.server_name
    return ctx


def _short(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return str(exc)


# -- why a connection failed ---------------------------------------------------------------------

_UNTRUSTED = "the broker's certificate is not signed by a CA in mqtt.tls.ca_file"
_VERIFY_HINTS = {
    "unable to get local issuer certificate": _UNTRUSTED,
    "self-signed certificate in certificate chain": _UNTRUSTED,
    "self signed certificate in certificate chain": _UNTRUSTED,
    "self-signed certificate": _UNTRUSTED,
    "certificate has expired": "the broker's certificate has expired",
    "certificate is not yet valid": "the broker's certificate is not valid yet (check the clocks)",
}
_PLAIN_PORT = "the broker does not speak TLS on this port (a plain MQTT port?)"
_ALERT_HINTS = {
    "CERTIFICATE_REQUIRED": "the broker requires a client certificate (mqtt.tls.cert_file)",
    "HANDSHAKE_FAILURE": "the broker refused the handshake (it requires a client certificate, "
                         "or there is no common TLS version or cipher)",
    "UNKNOWN_CA": "the broker does not trust the CA of the client certificate (mqtt.tls.cert_file)",
    "BAD_CERTIFICATE": "the broker rejected the client certificate (mqtt.tls.cert_file)",
    "CERTIFICATE_EXPIRED": "the broker says the client certificate has expired",
    "PROTOCOL_VERSION": "no TLS version both sides accept (mqtt.tls.min_version)",
    "WRONG_VERSION_NUMBER": _PLAIN_PORT,
    "PACKET_LENGTH_TOO_LONG": _PLAIN_PORT,
    "RECORD_LAYER_FAILURE": _PLAIN_PORT,
    "UNEXPECTED_EOF": "the broker closed the connection during the handshake (a plain MQTT port?)",
    "EOF occurred in violation of protocol": "the broker closed the connection during the handshake "
                                             "(a plain MQTT port?)",
}
_BAD_LOGIN = "bad user name or password (mqtt.username, EDGE_GATEWAY_MQTT_PASSWORD or mqtt.password_file)"
_NOT_AUTHORIZED = ("not authorized: the broker refused the user name or password, or this user may not connect "
                   "(mqtt.username, EDGE_GATEWAY_MQTT_PASSWORD or mqtt.password_file)")
_CONNACK_HINTS = {
    2: "client identifier refused (mqtt.client_id)", 133: "client identifier refused (mqtt.client_id)",
    3: "broker unavailable", 136: "broker unavailable",
    4: _BAD_LOGIN, 134: _BAD_LOGIN,
    5: _NOT_AUTHORIZED, 135: _NOT_AUTHORIZED,
}


def reason(exc: BaseException, *, tls: bool = False, logged: BaseException | None = None) -> str:
    """One readable line for a failed or lost broker connection, with the client's own words at the end.

    ``logged`` is a socket error the MQTT client only logged (with TLS 1.3 the broker refuses a
    client certificate after the handshake, and the client then just times out waiting for CONNACK).
    """
    if isinstance(exc, TlsFileError):
        return f"mqtt.tls.{exc.field}: {exc}"
    text = str(exc)
    cause = exc.__cause__ or exc.__context__  # the MQTT client re-raises OSErrors with their text only
    if not isinstance(cause, ssl.SSLError) and isinstance(logged, ssl.SSLError):
        cause, text = logged, f"{text} after: {logged}"
    if isinstance(cause, ssl.SSLError):
        hint = _tls_reason(cause)
        return f"TLS: {hint} [{text}]" if hint else f"TLS error: {text}"
    if isinstance(cause, ConnectionRefusedError):
        return f"connection refused: nothing listens on the broker's port, or a firewall rejects it [{text}]"
    if tls and isinstance(cause, ConnectionResetError):
        return f"TLS: the broker closed the connection during the handshake (a plain MQTT port?) [{text}]"
    rc = getattr(exc, "rc", None)
    code = getattr(rc, "value", rc)
    if type(exc).__name__ == "MqttConnectError" and isinstance(code, int):
        return f"connection refused by the broker: {_CONNACK_HINTS.get(code, str(rc))} [{text}]"
    return text


def _tls_reason(err: ssl.SSLError) -> str | None:
    if isinstance(err, ssl.SSLCertVerificationError):
        msg = err.verify_message or str(err)
        if "mismatch" in msg:  # "Hostname mismatch", "IP address mismatch"
            return "the broker's certificate does not name the host connected to (mqtt.host, mqtt.tls.server_name)"
        return f"broker certificate not trusted: {_VERIFY_HINTS.get(msg, msg)}"
    found = str(err.reason or "") + str(err)
    return next((hint for key, hint in _ALERT_HINTS.items() if key in found), None)
