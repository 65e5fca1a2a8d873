"""systemd: the unit passes `systemd-analyze verify` and rates <= 2.0 in `security`; sd_notify messages are right."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, healthy_rows, publish_rows, wait_until

UNIT = REPO / "systemd" / "edgecast-agent.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (CI installs systemd)")


@pytest.fixture
def runnable_unit(tmp_path) -> Path:
    """The shipped unit with ExecStart pointing at this interpreter (verify checks the executable exists)."""
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable} -m agent", UNIT.read_text(), flags=re.M)
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


@needs_analyze
def test_unit_passes_systemd_analyze_verify(runnable_unit):
    """`systemd-analyze verify` accepts the unit without a warning about it."""
    result = subprocess.run([ANALYZE, "verify", str(runnable_unit)], capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines() if runnable_unit.name in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


@needs_analyze
def test_unit_security_exposure_is_ok(runnable_unit):
    """`systemd-analyze security` rates the unit 2.0 or lower ("OK")."""
    result = subprocess.run([ANALYZE, "security", "--offline=true", str(runnable_unit)], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout + result.stderr
    score = float(match.group(1))
    print(f"\nsystemd-analyze security: {score} {match.group(2)}")
    assert score <= 2.0 and match.group(2) == "OK"


def test_unit_has_the_required_settings():
    """Type=notify with a watchdog, restart limits, a dynamic user, state dir, credentials and the hardening set."""
    text = UNIT.read_text()
    for line in ("Type=notify", "Restart=on-failure", "StartLimitBurst=", "DynamicUser=yes", "StateDirectory=edgecast",
                 "LoadCredential=", "ProtectSystem=strict", "ProtectHome=yes", "NoNewPrivileges=yes", "PrivateTmp=yes",
                 "PrivateDevices=yes", "RestrictAddressFamilies=", "SystemCallFilter=@system-service", "CapabilityBoundingSet=\n",
                 "MemoryMax=", "WatchdogSec="):
        assert line in text, line


class NotifySocket:
    """A unix datagram socket standing in for systemd's; `messages` collects what the agent sends."""

    def __init__(self, address: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.address = address
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
            except OSError:
                return

    def fields(self) -> list[str]:
        return [field for message in list(self.messages) for field in message.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.mark.mqtt
@pytest.mark.parametrize("abstract", [False, True])
def test_daemon_sends_ready_status_watchdog_and_stopping(start_daemon, make_probe, tmp_path, abstract):
    """READY=1 after start, STATUS= lines, WATCHDOG=1 every WatchdogSec/2, STOPPING=1 on SIGTERM (path and @abstract)."""
    address = f"@edgecast-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "notify.sock")
    notify = NotifySocket(address)
    try:
        daemon = start_daemon(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "600000"})  # ping every 0.3 s
        daemon.wait_online(make_probe())
        wait_until(lambda: notify.fields().count("WATCHDOG=1") >= 3, timeout=15, message="three watchdog pings")
        fields = notify.fields()
        assert fields[0] == "READY=1" and fields[1].startswith("STATUS=started")
        assert any(f.startswith("STATUS=connected") for f in fields), fields
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        wait_until(lambda: "STOPPING=1" in notify.fields(), timeout=5, message="STOPPING=1")
    finally:
        notify.close()


@pytest.mark.mqtt
def test_watchdog_is_not_fed_while_the_worker_is_stuck(agent_settings, subscriber, tmp_path):
    """A stalled worker stops the WATCHDOG=1 pings and says why in STATUS=; they resume once it moves again."""
    from agent.app import Agent
    from agent.ops.notify import Notifier

    notify = NotifySocket(str(tmp_path / "notify.sock"))
    agent = Agent(agent_settings(health={"max_stall_s": 1.0}),
                  notifier=Notifier({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "400000"}))
    agent.start()
    release = threading.Event()
    try:
        assert agent.wait_connected(10)
        wait_until(lambda: "WATCHDOG=1" in notify.fields(), timeout=5, message="a first ping")
        real_prepare = agent.pipeline.prepare

        def stuck(samples):  # fault injection: inference hangs
            release.wait(30)
            return real_prepare(samples)

        agent.pipeline.prepare = stuck
        publish_rows(subscriber, healthy_rows(devices=1, rows=2, seed=1))
        # stuck where the batch runs: the MQTT thread at a trickle of readings, the worker under a backlog
        wait_until(lambda: any(f.startswith("STATUS=unhealthy: ") for f in notify.fields()), timeout=10,
                   message="an unhealthy status")
        pings_when_unhealthy = notify.fields().count("WATCHDOG=1")
        unhealthy = lambda: sum(f.startswith("STATUS=unhealthy") for f in notify.fields())  # noqa: E731
        seen = unhealthy()
        wait_until(lambda: unhealthy() >= seen + 3, timeout=5, message="three more watchdog rounds, all unhealthy")
        assert notify.fields().count("WATCHDOG=1") == pings_when_unhealthy, "no pings while the worker is stuck"
        release.set()
        wait_until(lambda: notify.fields().count("WATCHDOG=1") > pings_when_unhealthy, timeout=10, message="pings to resume")
    finally:
        release.set()
        agent.stop()
        notify.close()
