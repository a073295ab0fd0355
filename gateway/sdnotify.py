"""systemd notification protocol: datagrams to $NOTIFY_SOCKET (sd_notify(3)), no libsystemd needed.

READY=1 once the tag map is loaded and the buffer is open; WATCHDOG=1 from a task on the event loop
itself, so a blocked loop stops the pings and systemd restarts the service; STOPPING=1 at shutdown.
"""

from __future__ import annotations

import asyncio
import os
import socket


class Notifier:
    def __init__(self, socket_path: str | None = None, watchdog_usec: str | None = None) -> None:
        self.path = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET")
        usec = watchdog_usec if watchdog_usec is not None else os.environ.get("WATCHDOG_USEC")
        self.watchdog = int(usec) / 1e6 if usec and usec.isdigit() and int(usec) > 0 else None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def notify(self, *lines: str) -> None:
        if not self.path:
            return
        address = "\0" + self.path[1:] if self.path.startswith("@") else self.path  # abstract namespace
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        try:
            self._sock.sendto("\n".join(lines).encode(), address)
        except OSError:
            pass  # systemd gone or socket full: nothing to report to, and no reason to stop the gateway

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    async def watchdog_loop(self) -> None:
        """Ping at half the watchdog interval, from the event loop (a blocked loop stops pinging)."""
        if self.watchdog is None or not self.path:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog / 2)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
