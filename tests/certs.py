"""Test PKI made with ``cryptography``: a CA, a broker certificate, a client certificate, a rogue CA.

EC P-256 keys (fast to make), PEM files in one directory. The broker certificate names
``localhost`` and ``127.0.0.1``; the client certificate is for clientAuth only.

``opcua_certificate``: a self-signed OPC-UA application instance certificate (RSA 2048, as the
RSA security policies need), with its URI in the subjectAltName.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class Pki:
    ca: Path  # CA certificate that signed server and client
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # an unrelated CA: trusting only it, the broker's certificate is unknown
    rogue_client_cert: Path  # a client certificate the broker's CA never signed
    rogue_client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edge-gateway tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key() -> Key:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: Key) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _builder(subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(_name(subject)).issuer_name(issuer).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))


def make_ca(cn: str) -> tuple[x509.Certificate, Key]:
    key = _key()
    cert = (_builder(cn, _name(cn), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca: x509.Certificate, ca_key: Key, cn: str, *, server: bool,
          names: tuple[str, ...] = (), ips: tuple[str, ...] = ()) -> tuple[x509.Certificate, Key]:
    key = _key()
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(cn, ca.subject, key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),  # type: ignore[arg-type]
                              critical=False)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    """Every file a TLS test needs, written to ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca("edge test CA")
    server, server_key = issue(ca, ca_key, "broker", server=True, names=("localhost",), ips=("127.0.0.1",))
    client, client_key = issue(ca, ca_key, "edge-01", server=False)
    rogue, rogue_key = make_ca("unrelated CA")
    rogue_client, rogue_client_key = issue(rogue, rogue_key, "edge-01", server=False)
    return Pki(
        ca=_write_cert(directory / "ca.pem", ca),
        server_cert=_write_cert(directory / "server.pem", server),
        server_key=_write_key(directory / "server-key.pem", server_key),
        client_cert=_write_cert(directory / "client.pem", client),
        client_key=_write_key(directory / "client-key.pem", client_key),
        rogue_ca=_write_cert(directory / "rogue-ca.pem", rogue),
        rogue_client_cert=_write_cert(directory / "rogue-client.pem", rogue_client),
        rogue_client_key=_write_key(directory / "rogue-client-key.pem", rogue_client_key),
    )


@dataclass(frozen=True)
class OpcUaCertificate:
    cert: Path  # DER, as PLCs export and import them
    pem: Path  # the same certificate as PEM
    key: Path  # PEM, unencrypted
    der: bytes

    @property
    def thumbprint(self) -> str:
        """SHA-1 of the DER, in hex: how OPC-UA servers name and show certificates."""
        return hashlib.sha1(self.der, usedforsecurity=False).hexdigest()


def opcua_certificate(directory: Path, name: str, uri: str, *, server: bool) -> OpcUaCertificate:
    """A self-signed application instance certificate for ``uri`` (also names localhost, 127.0.0.1)."""
    from asyncua.crypto.cert_gen import (
        dump_private_key_as_pem,
        generate_private_key,
        generate_self_signed_app_certificate,
    )

    directory.mkdir(parents=True, exist_ok=True)
    key = generate_private_key()
    use = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = generate_self_signed_app_certificate(
        key, name, {"organizationName": "edge-gateway tests"},
        [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost"),
         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], [use], days=2,
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    cert_path, pem_path, key_path = directory / f"{name}.der", directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_path.write_bytes(der)
    pem_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(dump_private_key_as_pem(key))
    key_path.chmod(0o600)
    return OpcUaCertificate(cert_path, pem_path, key_path, der)
