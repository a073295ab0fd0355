"""Starting a local Mosquitto for the demo and the tests (stopped by its pid, never by name)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, outside the kernel's range for outgoing connections where it can: no client
    connection takes it as its local port before the server meant for it binds it, or binds it again
    after a restart."""
    low, high = _ephemeral_range()
    ports = range(10_000, low) if low > 11_000 else range(high + 1, 65_536) if high < 64_500 else range(0)
    # SystemRandom, not the seeded module state: parallel test workers pick apart.
    for port in random.SystemRandom().sample(ports, min(50, len(ports))):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535  # the IANA range, which other systems use


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
    )


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener: the broker's certificate and key, and the CA its clients' certificates need."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False
    port: int | None = None


class Mosquitto:
    """A private Mosquitto on ``port`` with persistence in its own directory (restartable)."""

    def __init__(self, port: int | None = None, *, workdir: Path | None = None, extra: str = "",
                 tls: BrokerTls | None = None, users: dict[str, str] | None = None,
                 acl_file: Path | None = None) -> None:
        """``tls`` adds a TLS listener on ``tls_port``; ``users`` (name -> password) turns off
        anonymous access on every listener; ``acl_file`` restricts topics (Mosquitto's format)."""
        binary = find_mosquitto()
        if binary is None:
            raise FileNotFoundError("mosquitto not found (Debian: apt-get install -y mosquitto)")
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="mosquitto-"))
        self.conf = self.workdir / "mosquitto.conf"
        self.password_file = self.workdir / "passwd"
        self.tls_port: int | None = None
        security = ""
        if tls is not None:
            self.tls_port = tls.port or free_port()
            security += (f"listener {self.tls_port} {self.host}\n"
                         f"cafile {tls.cafile}\ncertfile {tls.certfile}\nkeyfile {tls.keyfile}\n"
                         f"require_certificate {'true' if tls.require_certificate else 'false'}\n"
                         "tls_version tlsv1.2\n")
        if users is not None:
            self.set_passwords(users)
            security += f"password_file {self.password_file}\n"
        if acl_file is not None:
            security += f"acl_file {acl_file}\n"
        self.conf.write_text(
            f"listener {self.port} {self.host}\n"
            + security
            + f"allow_anonymous {'false' if users is not None else 'true'}\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 0\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            # As root, Mosquitto would switch to the user "mosquitto", which cannot write to a
            # private temporary directory: its persistence would silently not work.
            + ("user root\n" if os.geteuid() == 0 else "")
            + "log_dest stderr\n"
            "log_type error\n"
            + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def set_passwords(self, users: dict[str, str]) -> None:
        """(Re)write the password file with ``mosquitto_passwd -b``; a running broker reads it on reload()."""
        tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        self.password_file.unlink(missing_ok=True)
        self.password_file.touch(mode=0o600)
        for user, password in users.items():
            subprocess.run([tool, "-b", str(self.password_file), user, password], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def reload(self) -> None:
        """SIGHUP: Mosquitto reloads its password and ACL files; existing clients stay connected."""
        if self.proc is None:
            raise RuntimeError("mosquitto is not running")
        self.proc.send_signal(signal.SIGHUP)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "mosquitto.log", "ab"),  # noqa: SIM115
        )
        try:
            wait_port(self.host, self.port)
            if self.tls_port is not None:
                wait_port(self.host, self.tls_port)
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"mosquitto did not start on port {self.port}: {self.log()}") from None

    def stop(self) -> None:
        """SIGTERM (Mosquitto saves its persistence file), then raise if it logged an error."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errors = [line for line in self.log().splitlines() if "Error:" in line]
        if errors:
            raise RuntimeError(f"mosquitto on port {self.port} logged errors: {errors[:3]}")

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
