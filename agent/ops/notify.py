"""sd_notify without libsystemd: datagrams to $NOTIFY_SOCKET (a path, or '@name' in the abstract namespace).

Type=notify units wait for READY=1; STATUS= shows in `systemctl status`; WATCHDOG=1 must arrive within
WatchdogSec= or systemd kills and restarts the service. The agent only sends WATCHDOG=1 after a real
liveness check (worker and MQTT loop), so a hung daemon is restarted rather than kept "alive" by a timer.
Outside systemd (no NOTIFY_SOCKET) every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None):
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]  # Linux abstract socket namespace
        self._address = address
        self._socket: socket.socket | None = None
        if address is not None:
            try:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            except OSError as exc:
                log.warning("cannot create the sd_notify socket: %s", exc)
        self.watchdog_s = self._watchdog_interval(environ)

    @staticmethod
    def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when no watchdog applies to us."""
        usec = environ.get("WATCHDOG_USEC")
        pid = environ.get("WATCHDOG_PID")
        if not usec:
            return None
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None
        try:
            value = int(usec)
        except ValueError:
            return None
        return value / 2e6 if value > 0 else None

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *fields: str) -> bool:
        """Send e.g. notify("READY=1", "STATUS=running"); False when not under systemd or the send failed."""
        if self._socket is None or self._address is None:
            return False
        message = "\n".join(field.replace("\n", " ") for field in fields).encode("utf-8")
        try:
            self._socket.sendto(message, self._address)
            return True
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)
            return False

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
