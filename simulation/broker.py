"""The embedded MQTT 3.1.1 broker for machines without mosquitto: amqtt (a maintained asyncio broker, PyPI
`amqtt`) on its own event loop in a background thread.

Used by the demo (`python -m training demo --broker embedded`, and automatically when mosquitto is not
installed) and by `python -m training broker`. amqtt is not part of the edge install: it comes with the `demo`
extra (`pip install 'edgecast[demo]'`, which scripts/demo.sh installs) and the `dev` extra.

    with EmbeddedBroker() as broker:        # listens on 127.0.0.1 and a free port
        client.connect("127.0.0.1", broker.port)

What the daemon relies on, and this broker serves (tests/test_embedded_broker.py runs the daemon on it): `+` / `#`
subscriptions, QoS 0 and 1 both ways, retained messages (an empty retained payload clears the topic), the last
will (retained) on a connection lost without DISCONNECT, and none after a clean DISCONNECT, persistent sessions
(`mqtt.at_least_once`: clean session off; QoS 1 messages are queued while the client is away). Two amqtt 0.12.1
bugs are fixed here (`_Broker`): a connecting client was sent the retained messages of every *other* client's
subscriptions, and a client silent past its keepalive was never dropped (so its will never came).

Limitations (amqtt's; none is on the daemon's default path): every client is accepted (no authentication, no
ACL) and there is no TLS; MQTT 3.1 clients (protocol name "MQIsdp") are refused, 3.1.1 only; messages are
delivered at the subscription's QoS (a QoS 0 publish reaches a QoS 1 subscriber as QoS 1); sessions and retained
messages live in memory only and end with the broker; a second client connecting with the same client id takes
the session over but the first connection is not closed (it just stops receiving), so the daemon's
duplicate-client-id warning, which watches for the disconnects mosquitto causes, stays silent.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import socket
import sys
import threading
import time
from dataclasses import dataclass

log = logging.getLogger("edgecast.embedded_broker")

INSTALL_HINT = ("the embedded MQTT broker needs amqtt: pip install 'edgecast[demo]' (or install mosquitto: "
                "apt-get install mosquitto)")

try:  # the demo and dev extras; the edge install has no amqtt
    from amqtt.broker import Broker as _AmqttBroker
    from amqtt.plugins.base import BaseAuthPlugin as _BaseAuthPlugin
except ImportError as exc:
    _AmqttBroker = _BaseAuthPlugin = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None


class BrokerUnavailable(RuntimeError):
    """amqtt is not installed (it is in the `demo` and `dev` extras, not in the edge install)."""


if _AmqttBroker is not None:

    class OpenAuthPlugin(_BaseAuthPlugin):
        """Accepts every client, like AnonymousAuthPlugin, without marking the session anonymous: amqtt drops an
        anonymous client's persistent session a second after it disconnects and queues nothing for it, so
        `mqtt.at_least_once` (clean session off) would lose what arrives while the daemon reconnects."""

        @dataclass
        class Config:
            pass

        async def authenticate(self, *, session) -> bool:
            return True

    class _Broker(_AmqttBroker):
        """amqtt's broker with two fixes of amqtt 0.12.1 that the daemon would otherwise hit.

        Retained messages: on every CONNECT, amqtt replays the retained messages that match *any* client's
        subscription filter to the connecting client (broker.py, `_client_connected`): a client that subscribed to
        one status topic first receives, say, every retained `edgecast/...` message because another client
        subscribed to `edgecast/#`. Here the replay is limited to the filters the session itself holds (a resumed
        persistent session); a SUBSCRIBE still gets the retained messages of its own filter, as MQTT 3.1.1 requires.

        Keepalive: amqtt notices a client silent past its keepalive but does nothing about it (the broker's
        `handle_read_timeout` is empty), so a gateway that lost its network without a TCP reset would stay
        "online" forever and its last will would never be published. Here the connection is closed after 1.5 x
        the keepalive (MQTT 3.1.1 section 3.1.2.10), which publishes the will."""

        async def _initialize_client_session(self, *args, **kwargs):
            handler, session = await super()._initialize_client_session(*args, **kwargs)
            if session.keep_alive > 0:
                session.keep_alive = math.ceil(session.keep_alive * 1.5)  # the reader's timeout, read when it starts

                def close_silent_client() -> None:
                    asyncio.ensure_future(handler.handle_connection_closed())  # -> the will, then the handler stops

                handler.handle_read_timeout = close_silent_client
            return handler, session

        async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
            holders = self._subscriptions.get(subscription[0], ())
            if not any(held is session for held, _ in holders):
                return
            await super()._publish_retained_messages_for_subscription(subscription, session)


def _quiet_amqtt_logs(verbose: bool) -> None:
    """amqtt logs every connection at INFO and a refused or dropped client as a WARNING/ERROR with a traceback;
    inside the demo that would land in its live view. Keep it at CRITICAL unless asked (or already configured)."""
    amqtt_log = logging.getLogger("amqtt")
    if verbose:
        amqtt_log.setLevel(logging.INFO)
    elif amqtt_log.level == logging.NOTSET:
        amqtt_log.setLevel(logging.CRITICAL)
    # `transitions` (amqtt's state machines) logs every state change at INFO.
    transitions_log = logging.getLogger("transitions")
    if transitions_log.level == logging.NOTSET:
        transitions_log.setLevel(logging.WARNING)


class EmbeddedBroker:
    """amqtt's broker listening on host:port (0: a free port, read back once bound) in a daemon thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, verbose: bool = False, start_timeout: float = 15.0):
        self.host = host
        self.port = port  # the bound port once started
        self.verbose = verbose
        self.start_timeout = start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    def config(self) -> dict:
        """amqtt's configuration: one TCP listener, every client accepted, no $SYS publisher, no packet logging."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{self.port}"}},
            "plugins": {"simulation.broker.OpenAuthPlugin": {}},
        }

    # ------------------------------------------------------------------ lifecycle (called from any thread)

    def start(self) -> "EmbeddedBroker":
        """Start serving; returns once a TCP connect to the port succeeds. Raises BrokerUnavailable without amqtt,
        OSError when the address cannot be bound, RuntimeError when the broker does not come up in time."""
        if self._thread is not None:
            raise RuntimeError("broker already started")
        if _AmqttBroker is None:
            raise BrokerUnavailable(f"{INSTALL_HINT} ({_IMPORT_ERROR})")
        _quiet_amqtt_logs(self.verbose)
        self._ready.clear()
        self._startup_error = None
        self._thread = threading.Thread(target=self._run_loop, name="embedded-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            self.stop()
            raise RuntimeError(f"the embedded broker did not start within {self.start_timeout:.0f} s")
        if self._startup_error is not None:
            self._thread.join(5.0)
            self._thread = None
            raise self._startup_error
        self._wait_accepting(self.start_timeout)
        log.debug("embedded MQTT broker (amqtt) listening on %s:%d", self.host, self.port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every client connection and the listener, then end the thread. Safe to call twice."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and loop.is_running():
            if self._broker is not None:
                future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
                try:
                    future.result(timeout)
                except Exception as exc:  # noqa: BLE001 - a failing shutdown must not keep the thread alive
                    log.warning("embedded broker shutdown: %s", exc)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        self._thread = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the broker's thread

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._start())
            except BaseException as exc:  # noqa: BLE001 - reported to start()
                self._startup_error = self._startup_exception(exc)
                self._ready.set()
                return
            self._ready.set()
            loop.run_forever()
        finally:
            try:
                pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
                self._loop = None

    async def _start(self) -> None:
        broker = _Broker(self.config())
        await broker.start()
        self._broker = broker
        self.port = self._bound_port(broker)

    async def _shutdown(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.shutdown()

    def _bound_port(self, broker) -> int:
        """The port the listener got (the configured one, or the free one the OS chose for port 0)."""
        server = getattr(broker, "_servers", {}).get("default")
        sockets = getattr(getattr(server, "instance", None), "sockets", None) or ()
        for sock in sockets:
            return int(sock.getsockname()[1])
        if self.port:
            return self.port
        raise RuntimeError("amqtt did not report the port it listens on (use an explicit --port)")

    @staticmethod
    def _startup_exception(exc: BaseException) -> BaseException:
        """amqtt wraps a bind failure in BrokerError: give the caller the OSError (address in use, permission)."""
        seen = exc
        while seen is not None:
            if isinstance(seen, OSError):
                return seen
            seen = seen.__cause__ or seen.__context__
        return exc

    def _wait_accepting(self, timeout: float) -> None:
        connect_host = "127.0.0.1" if self.host in ("", "0.0.0.0") else ("::1" if self.host == "::" else self.host)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((connect_host, self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() >= deadline:
                    self.stop()
                    raise RuntimeError(f"the embedded broker does not accept connections on {connect_host}:{self.port}") from None
                time.sleep(0.05)  # polling a port that is not open yet: nothing to wait on


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="TCP port (0: a free one; default 1883)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection (amqtt's INFO log)")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C / SIGTERM."""
    import signal

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    broker = EmbeddedBroker(args.host, args.port, verbose=args.verbose)
    try:
        broker.start()
    except BrokerUnavailable as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"broker: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 1
    print(f"broker: MQTT 3.1.1 (amqtt) listening on {args.host}:{broker.port} (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            if not broker.running:
                print("broker: the broker's thread ended unexpectedly", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training broker", description="Run the embedded MQTT 3.1.1 broker (amqtt).")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
