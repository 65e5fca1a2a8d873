"""A small embedded MQTT 3.1.1 broker (stdlib asyncio only) so the demo runs on machines without mosquitto.

Supported: CONNECT/CONNACK (protocol level 4 "MQTT", and level 3 "MQIsdp"), SUBSCRIBE/SUBACK with `+` and
`#` wildcards (filters starting with a wildcard do not match `$` topics), UNSUBSCRIBE/UNSUBACK, PUBLISH at
QoS 0 and 1 in both directions (delivery at min(publish qos, granted qos); granted qos is at most 1, so QoS 2
requests are granted 1; an inbound QoS 2 publish gets the PUBREC/PUBREL/PUBCOMP handshake and is forwarded
once), retained messages (an empty retained payload clears the topic), the last will (retained or not) on an
abnormal disconnect, a session take-over or keepalive expiry (1.5 x keepalive), PINGREQ/PINGRESP,
DISCONNECT, and a maximum packet size (larger packets close the connection).

Not a production broker: no authentication (any user name/password is accepted), no TLS, and every session
is treated as clean (a `clean_session=False` client is accepted, gets `session present = 0`, and nothing is
kept for it after it disconnects). Unacknowledged QoS 1 deliveries are not resent.

    with EmbeddedBroker() as broker:        # listens on 127.0.0.1 and a free port
        client.connect("127.0.0.1", broker.port)

CLI: `python -m training broker --port 1883`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import struct
import sys
import threading
from dataclasses import dataclass, field

log = logging.getLogger("edgecast.minibroker")

# Control packet types (MQTT 3.1.1, section 2.2.1).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

# CONNACK return codes.
ACCEPTED, BAD_PROTOCOL_VERSION, IDENTIFIER_REJECTED = 0, 1, 2

MAX_REMAINING_LENGTH = 268_435_455  # four length bytes
SUBACK_FAILURE = 0x80


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is closed (and its will published)."""


# ---------------------------------------------------------------------------------------------- encoding


def encode_remaining_length(length: int) -> bytes:
    """The variable-length encoding of the fixed header (7 bits per byte, high bit = more bytes follow)."""
    if not 0 <= length <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {length} outside 0..{MAX_REMAINING_LENGTH}")
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)


def decode_remaining_length(data: bytes) -> tuple[int, int]:
    """(length, bytes used) from the start of `data`; raises ProtocolError past four bytes."""
    value, multiplier = 0, 1
    for used, byte in enumerate(data[:4], start=1):
        value += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return value, used
        multiplier *= 128
    if len(data) >= 4:
        raise ProtocolError("remaining length longer than four bytes")
    raise ValueError("incomplete remaining length")


def packet(packet_type: int, flags: int, body: bytes) -> bytes:
    return bytes([packet_type << 4 | flags]) + encode_remaining_length(len(body)) + body


def utf8_field(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("!H", len(raw)) + raw


class Reader:
    """Cursor over a packet body; running past the end is a protocol error, not an IndexError."""

    def __init__(self, body: bytes):
        self.body, self.pos = body, 0

    def remaining(self) -> int:
        return len(self.body) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.remaining():
            raise ProtocolError("packet shorter than its fields")
        chunk = self.body[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("!H", self.take(2))[0]

    def binary(self) -> bytes:
        return self.take(self.u16())

    def text(self) -> str:
        try:
            value = self.binary().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("string field is not UTF-8") from exc
        if "\x00" in value:
            raise ProtocolError("string field contains U+0000")
        return value


# ---------------------------------------------------------------------------------------------- topics


def valid_topic_name(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic


def valid_topic_filter(topic_filter: str) -> bool:
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching: `+` one level, `#` this level and everything below; wildcards never open a `$` topic."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True  # also matches the parent level itself ("a/#" matches "a")
        if i >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)


# ---------------------------------------------------------------------------------------------- sessions


@dataclass
class Message:
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(eq=False)
class Session:
    client_id: str
    writer: asyncio.StreamWriter
    keepalive_s: int
    will: Message | None = None
    subscriptions: dict[str, int] = field(default_factory=dict)  # filter -> granted qos
    packet_ids: itertools.cycle = field(default_factory=lambda: itertools.cycle(range(1, 65536)))
    awaiting_puback: set[int] = field(default_factory=set)
    qos2_received: set[int] = field(default_factory=set)  # inbound QoS 2 ids forwarded, PUBREL pending
    closed: bool = False

    def send(self, data: bytes) -> None:
        if not self.closed:
            self.writer.write(data)


# ---------------------------------------------------------------------------------------------- broker


class EmbeddedBroker:
    """An MQTT 3.1.1 broker on its own event loop in a background thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        max_packet_size: int = 8 * 1024 * 1024,
        max_client_backlog: int = 64 * 1024 * 1024,
    ):
        self.host = host
        self.port = port  # the bound port once started (a free one when 0)
        self.max_packet_size = max_packet_size
        self.max_client_backlog = max_client_backlog  # bytes queued to a client that does not read; then it is dropped
        self.retained: dict[str, Message] = {}
        self.sessions: dict[str, Session] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._client_tasks: set[asyncio.Task] = set()
        self._generated_ids = itertools.count(1)

    # ------------------------------------------------------------------ lifecycle (called from any thread)

    def start(self) -> "EmbeddedBroker":
        """Start listening; returns once the socket is bound (raises OSError if it cannot be)."""
        if self._thread is not None:
            raise RuntimeError("broker already started")
        self._thread = threading.Thread(target=self._run_loop, name="minibroker", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error
        log.debug("embedded MQTT broker listening on %s:%d", self.host, self.port)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every client connection, then end the thread."""
        if self._thread is None or self._loop is None:
            return
        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._handle_client, self.host, self.port, limit=2**16)
            )
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for session in list(self.sessions.values()):
            session.will = None  # a broker shutdown is not the client's fault
            session.writer.close()
        for task in list(self._client_tasks):
            task.cancel()
        await asyncio.gather(*self._client_tasks, return_exceptions=True)
        await self._server.wait_closed()

    # ------------------------------------------------------------------ one connection

    async def _handle_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._client_tasks.add(task)
        peer = writer.get_extra_info("peername")
        session: Session | None = None
        clean_exit = False
        try:
            session = await self._accept_connect(reader, writer)
            if session is None:
                return
            # The spec allows one and a half keepalive periods of silence before the client is considered gone.
            timeout = session.keepalive_s * 1.5 if session.keepalive_s else None
            while True:
                try:
                    packet_type, flags, body = await asyncio.wait_for(self._read_packet(reader), timeout)
                except asyncio.TimeoutError:
                    log.info("client %s: keepalive expired", session.client_id)
                    break
                if packet_type == DISCONNECT:
                    clean_exit = True
                    break
                self._dispatch(session, packet_type, flags, body)
                if writer.transport.get_write_buffer_size() > 0:
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the peer went away without DISCONNECT: an abnormal close
        except ProtocolError as exc:
            log.warning("client %s (%s): protocol error: %s", session.client_id if session else "?", peer, exc)
        except asyncio.CancelledError:
            clean_exit = True  # broker shutdown
        finally:
            self._client_tasks.discard(task)
            if session is not None:
                self._end_session(session, publish_will=not clean_exit)
            writer.close()

    async def _read_packet(self, reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
        header = (await reader.readexactly(1))[0]
        length_bytes = bytearray()
        while True:
            byte = (await reader.readexactly(1))[0]
            length_bytes.append(byte)
            if not byte & 0x80:
                break
            if len(length_bytes) == 4:
                raise ProtocolError("remaining length longer than four bytes")
        length, _ = decode_remaining_length(bytes(length_bytes))
        if 1 + len(length_bytes) + length > self.max_packet_size:
            raise ProtocolError(f"packet of {length} bytes exceeds the maximum packet size {self.max_packet_size}")
        body = await reader.readexactly(length) if length else b""
        return header >> 4, header & 0x0F, body

    async def _accept_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Session | None:
        # A client that opens a socket and says nothing is dropped after a while.
        packet_type, flags, body = await asyncio.wait_for(self._read_packet(reader), 30.0)
        if packet_type != CONNECT:
            raise ProtocolError("first packet is not CONNECT")
        r = Reader(body)
        protocol_name = r.text()
        level = r.u8()
        if (protocol_name, level) not in (("MQTT", 4), ("MQIsdp", 3)):
            if protocol_name in ("MQTT", "MQIsdp"):
                writer.write(packet(CONNACK, 0, bytes([0, BAD_PROTOCOL_VERSION])))
                await writer.drain()
                return None
            raise ProtocolError(f"unknown protocol {protocol_name!r}")
        connect_flags = r.u8()
        if connect_flags & 0x01:
            raise ProtocolError("reserved CONNECT flag set")
        clean_session = bool(connect_flags & 0x02)
        will_flag, will_qos, will_retain = bool(connect_flags & 0x04), (connect_flags >> 3) & 0x03, bool(connect_flags & 0x20)
        if will_qos == 3 or (not will_flag and (will_qos or will_retain)):
            raise ProtocolError("invalid will flags")
        keepalive_s = r.u16()
        client_id = r.text()
        will = None
        if will_flag:
            will_topic = r.text()
            will_payload = r.binary()
            if not valid_topic_name(will_topic):
                raise ProtocolError(f"invalid will topic {will_topic!r}")
            will = Message(will_topic, will_payload, min(will_qos, 1), will_retain)
        if connect_flags & 0x80:
            r.text()  # user name: accepted, not checked
        if connect_flags & 0x40:
            r.binary()  # password: accepted, not checked
        if not client_id:
            if not clean_session:
                writer.write(packet(CONNACK, 0, bytes([0, IDENTIFIER_REJECTED])))
                await writer.drain()
                return None
            client_id = f"auto-{next(self._generated_ids)}"
        previous = self.sessions.get(client_id)
        if previous is not None:
            log.info("client %s: taken over by a new connection", client_id)
            self._end_session(previous, publish_will=True)
            previous.writer.close()
        session = Session(client_id=client_id, writer=writer, keepalive_s=keepalive_s, will=will)
        self.sessions[client_id] = session
        session.send(packet(CONNACK, 0, bytes([0, ACCEPTED])))  # session present = 0: every session is clean
        log.debug("client %s connected (keepalive %ds)", client_id, keepalive_s)
        return session

    def _end_session(self, session: Session, publish_will: bool) -> None:
        if session.closed:
            return
        session.closed = True
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        if publish_will and session.will is not None:
            log.info("client %s: publishing its last will on %s", session.client_id, session.will.topic)
            self._publish(session.will)
        session.will = None
        log.debug("client %s disconnected", session.client_id)

    # ------------------------------------------------------------------ packets

    def _dispatch(self, session: Session, packet_type: int, flags: int, body: bytes) -> None:
        if packet_type == PUBLISH:
            self._on_publish(session, flags, body)
        elif packet_type == PUBACK:
            session.awaiting_puback.discard(Reader(body).u16())
        elif packet_type == PUBREL:
            packet_id = Reader(body).u16()
            session.qos2_received.discard(packet_id)
            session.send(packet(PUBCOMP, 0, struct.pack("!H", packet_id)))
        elif packet_type in (PUBREC, PUBCOMP):
            pass  # the broker never sends QoS 2, so these can only be stray; ignore them
        elif packet_type == SUBSCRIBE:
            self._on_subscribe(session, flags, body)
        elif packet_type == UNSUBSCRIBE:
            self._on_unsubscribe(session, flags, body)
        elif packet_type == PINGREQ:
            session.send(packet(PINGRESP, 0, b""))
        elif packet_type == CONNECT:
            raise ProtocolError("second CONNECT on one connection")
        else:
            raise ProtocolError(f"unexpected packet type {packet_type}")

    def _on_publish(self, session: Session, flags: int, body: bytes) -> None:
        qos, retain = (flags >> 1) & 0x03, bool(flags & 0x01)
        if qos == 3:
            raise ProtocolError("PUBLISH with QoS 3")
        r = Reader(body)
        topic = r.text()
        if not valid_topic_name(topic):
            raise ProtocolError(f"invalid topic name {topic!r}")
        packet_id = r.u16() if qos else None
        payload = r.take(r.remaining())
        if qos == 1:
            session.send(packet(PUBACK, 0, struct.pack("!H", packet_id)))
        elif qos == 2:
            session.send(packet(PUBREC, 0, struct.pack("!H", packet_id)))
            if packet_id in session.qos2_received:
                return  # a resend before PUBREL: already forwarded once
            session.qos2_received.add(packet_id)
        self._publish(Message(topic, payload, min(qos, 1), retain))

    def _publish(self, message: Message) -> None:
        if message.retain:
            if message.payload:
                self.retained[message.topic] = message
            else:
                self.retained.pop(message.topic, None)  # an empty retained payload clears the topic
        for session in list(self.sessions.values()):
            granted = [qos for flt, qos in session.subscriptions.items() if topic_matches(flt, message.topic)]
            if granted:
                # One copy per client, at the largest QoS its matching subscriptions granted.
                # Messages to existing subscribers carry retain = 0 (3.1.1, 3.3.1.3).
                self._deliver(session, message, min(message.qos, max(granted)), retain=False)

    def _deliver(self, session: Session, message: Message, qos: int, retain: bool) -> None:
        if session.closed:
            return
        if session.writer.transport.get_write_buffer_size() > self.max_client_backlog:
            log.warning("client %s: not reading (%d bytes queued); disconnecting", session.client_id, self.max_client_backlog)
            self._end_session(session, publish_will=True)
            session.writer.close()
            return
        flags = (qos << 1) | int(retain)
        body = utf8_field(message.topic)
        if qos:
            packet_id = next(session.packet_ids)
            session.awaiting_puback.add(packet_id)
            body += struct.pack("!H", packet_id)
        session.send(packet(PUBLISH, flags, body + message.payload))

    def _on_subscribe(self, session: Session, flags: int, body: bytes) -> None:
        if flags != 0b0010:
            raise ProtocolError("SUBSCRIBE with wrong fixed-header flags")
        r = Reader(body)
        packet_id = r.u16()
        requests: list[tuple[str, int]] = []
        while r.remaining():
            topic_filter, requested = r.text(), r.u8()
            if requested & 0xFC:
                raise ProtocolError("SUBSCRIBE requested QoS out of range")
            requests.append((topic_filter, requested))
        if not requests:
            raise ProtocolError("SUBSCRIBE without topic filters")
        codes = bytearray()
        accepted: list[tuple[str, int]] = []
        for topic_filter, requested in requests:
            if not valid_topic_filter(topic_filter):
                codes.append(SUBACK_FAILURE)
                continue
            granted = min(requested, 1)
            session.subscriptions[topic_filter] = granted
            accepted.append((topic_filter, granted))
            codes.append(granted)
        session.send(packet(SUBACK, 0, struct.pack("!H", packet_id) + bytes(codes)))
        # Retained messages follow the SUBACK, flagged retain = 1.
        for topic_filter, granted in accepted:
            for message in list(self.retained.values()):
                if topic_matches(topic_filter, message.topic):
                    self._deliver(session, message, min(message.qos, granted), retain=True)

    def _on_unsubscribe(self, session: Session, flags: int, body: bytes) -> None:
        if flags != 0b0010:
            raise ProtocolError("UNSUBSCRIBE with wrong fixed-header flags")
        r = Reader(body)
        packet_id = r.u16()
        while r.remaining():
            session.subscriptions.pop(r.text(), None)
        session.send(packet(UNSUBACK, 0, struct.pack("!H", packet_id)))


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="TCP port (0: a free one; default 1883)")
    parser.add_argument("--max-packet-size", type=int, default=8 * 1024 * 1024, help="largest accepted packet in bytes")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C / SIGTERM."""
    import signal

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    broker = EmbeddedBroker(args.host, args.port, max_packet_size=args.max_packet_size)
    try:
        broker.start()
    except OSError as exc:
        print(f"broker: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"broker: MQTT 3.1.1 listening on {args.host}:{broker.port} (Ctrl-C to stop)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training broker", description="Run the embedded MQTT 3.1.1 broker.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
