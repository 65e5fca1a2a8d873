"""Store-and-forward: outgoing messages wait in SQLite (WAL) until the broker acknowledged them.

A message enters in the worker's transaction (`put_many`) and leaves only when the broker's PUBACK for it came
back (`acked`). Delivery is in insertion order at QoS 1, so each device's alerts arrive in order; after a crash
or a reconnect a message may come twice (QoS 1 "at least once"), never not at all, and the alert id identifies
the duplicate.

Bounds: `max_messages`, `max_bytes` and `max_age_s`. When full, forecasts are dropped before alerts, oldest
first; expired messages (any kind) are dropped. Every drop is counted by cause and logged.

A file that SQLite cannot read (power loss mid-write on a bad SD card, truncation) is moved aside as
`outbox.sqlite.corrupt-<UTC time>` (with its -wal/-shm), reported, and a fresh outbox is started.

A database that silently lost its latest transactions (its `-wal` file deleted, emptied or overwritten while the
daemon was stopped: SQLite then opens the older main file without a complaint) is noticed through
`outbox.watermark`, a small file beside it that records the highest message id ever stored and how many messages
are queued (class Watermark). At open, a database whose AUTOINCREMENT sequence is below that id lost stored
messages; how many of them were still queued is reported in `lost` (and logged at ERROR).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "outbox.sqlite"
WATERMARK_NAME = "outbox.watermark"
SCHEMA_VERSION = 1
KIND_PRIORITY = {"forecast": 0, "alert": 1, "fault": 1}  # lower is dropped first

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    priority INTEGER NOT NULL,
    device TEXT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_drop_order ON messages (priority, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class Message:
    kind: str  # "alert" | "forecast" | "fault"
    topic: str
    payload: bytes
    device: str | None = None
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Stored:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    size: int


class OutboxCorrupt(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Mark:
    stored: int  # the highest message id committed (the AUTOINCREMENT sequence)
    queued: int  # messages in the outbox after that write


class Watermark:
    """`outbox.watermark`: the outbox's high-water mark, kept outside the database so that losing the database's
    latest transactions (its -wal file) does not lose the record of them.

    Two fixed 64-byte slots, written in turn (pwrite), each with a generation number and a crc32: a torn write
    leaves the other slot, and the valid slot with the higher generation is the mark. Written after a commit
    that stored messages (fdatasync'ed when `durable`) and before a commit that removes messages, so the mark
    never claims more queued messages than the database holds unless the database lost transactions.
    """

    MAGIC = b"EWM1"
    _RECORD = struct.Struct("<4sQQQ")  # magic, generation, stored, queued
    _CRC = struct.Struct("<I")
    SLOT = 64

    def __init__(self, path: Path, durable: bool):
        self.path = path
        self.durable = durable
        self.generation = 0
        self._fd: int | None = None

    def read(self) -> Mark | None:
        """The last mark written, or None when there is no file; OutboxCorrupt when neither slot is valid."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        best: tuple[int, Mark] | None = None
        size = self._RECORD.size
        for slot in (0, 1):
            chunk = data[slot * self.SLOT : slot * self.SLOT + size + self._CRC.size]
            if len(chunk) < size + self._CRC.size:
                continue
            body, (crc,) = chunk[:size], self._CRC.unpack(chunk[size:])
            if zlib.crc32(body) != crc:
                continue
            magic, generation, stored, queued = self._RECORD.unpack(body)
            if magic == self.MAGIC and (best is None or generation > best[0]):
                best = (generation, Mark(stored, queued))
        if best is None:
            raise OutboxCorrupt(f"{self.path} holds no valid mark ({len(data)} bytes)")
        self.generation = best[0]
        return best[1]

    def write(self, stored: int, queued: int, sync: bool | None = None) -> None:
        if self._fd is None:
            created = not self.path.exists()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            if created:
                os.pwrite(self._fd, b"\0" * (2 * self.SLOT), 0)
                os.fsync(self._fd)
                _fsync_directory(self.path.parent)
        self.generation += 1
        body = self._RECORD.pack(self.MAGIC, self.generation, stored, max(0, queued))
        os.pwrite(self._fd, body + self._CRC.pack(zlib.crc32(body)), (self.generation % 2) * self.SLOT)
        if self.durable if sync is None else sync:
            os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _size(topic: str, payload: bytes) -> int:
    return len(payload) + len(topic)


class Outbox:
    """The durable queue; thread-safe (one SQLite connection behind a lock)."""

    def __init__(
        self,
        directory: Path,
        max_messages: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        max_age_s: float = 7 * 86400.0,
        synchronous: str = "full",
        clock: Callable[[], float] = time.time,
    ):
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self.moved_aside: Path | None = None  # where a corrupt file went at open, if one did
        self.corruption: str | None = None  # SQLite's complaint about it
        self.lost: str | None = None  # queued messages the database lost before this open (detected), described
        self.lost_range: tuple[int, int] | None = None  # (at least, at most) queued messages lost
        self.enqueued = 0
        self.sent = 0
        self.dropped: dict[str, int] = {"overflow_forecast": 0, "overflow_alert": 0, "expired": 0}
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open(synchronous)
        except (sqlite3.DatabaseError, OutboxCorrupt) as exc:
            self.corruption = str(exc)
            self.moved_aside = self._move_aside()
            log.error("outbox %s is unreadable (%s); moved it aside to %s and started a fresh one", self.path, exc, self.moved_aside)
            self._db = self._open(synchronous)
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload) + LENGTH(topic)), 0) FROM messages").fetchone()
        self.count, self.bytes = int(row[0]), int(row[1])
        self.recovered = self.count  # left by the previous run: delivered first
        self._mark = Watermark(self.directory / WATERMARK_NAME, durable=synchronous == "full")
        self._check_watermark()
        if self.recovered:
            log.info("outbox holds %d undelivered messages from before the restart; delivering them first", self.recovered)

    def _sequence_locked(self) -> int:
        """The highest message id ever committed (SQLite's AUTOINCREMENT sequence; 0 before the first)."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        return int(row[0]) if row else 0

    def _check_watermark(self) -> None:
        """At open: did the database lose stored messages since the watermark was written? Then the mark is reset."""
        try:
            mark = self._mark.read()
        except (OSError, OutboxCorrupt) as exc:
            log.warning("outbox watermark unreadable (%s): cannot tell whether queued messages were lost; starting a new one", exc)
            mark = None
        stored = self._stored = self._sequence_locked()
        if mark is not None and mark.stored > stored:
            # Messages up to id mark.stored were committed; the database now ends at `stored`. Of the lost ids,
            # those still queued when the mark was written are lost: at most min(queued, lost ids); at least the
            # queued ones the database cannot hold (it may hold messages whose removal was lost: duplicates).
            at_most = min(mark.queued, mark.stored - stored)
            at_least = min(at_most, max(0, mark.queued - self.count))
            if self.moved_aside is not None:
                if mark.queued:
                    log.error("outbox: the unreadable file moved aside held %d undelivered messages when last written; they are lost",
                              mark.queued)
            elif at_most > 0:
                count = str(at_most) if at_least == at_most else (f"between {at_least} and {at_most}" if at_least else f"up to {at_most}")
                self.lost_range = (at_least, at_most)
                self.lost = (
                    f"{count} queued message(s) lost: outbox {self.path} lost its latest transactions (its -wal file or the "
                    f"database was deleted, emptied or damaged): its last message id is {stored}, but {mark.stored} had been "
                    f"stored; the {self.count} message(s) it still holds will be delivered"
                )
                log.error("outbox: %s", self.lost)
        try:
            self._mark.write(stored, self.count, sync=True)
        except OSError as exc:
            log.warning("outbox watermark %s cannot be written (%s): lost messages would go unnoticed", self._mark.path, exc)

    def _mark_write(self, stored: int, queued: int, sync: bool | None = None) -> None:
        try:
            self._mark.write(stored, queued, sync)
        except OSError as exc:  # the database is what matters; the mark only detects its loss
            log.warning("outbox watermark %s cannot be written (%s)", self._mark.path, exc)

    def _open(self, synchronous: str) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxCorrupt(f"cannot switch {self.path} to WAL (journal_mode {mode})")
            db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
            check = db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise OutboxCorrupt("; ".join(str(r[0]) for r in check[:3]))
            db.executescript(_SCHEMA)
            version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if version is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif version[0] != str(SCHEMA_VERSION):
                raise OutboxCorrupt(f"schema version {version[0]}, expected {SCHEMA_VERSION}")
            # Every column read back must be what we wrote: a mangled table fails here, not at delivery.
            db.execute("SELECT id, kind, priority, device, topic, payload, qos, retain, created_at FROM messages LIMIT 1").fetchall()
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        target = self.path.with_name(f"{FILE_NAME}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                source.rename(Path(str(target) + suffix))
        return target

    # -- writing -------------------------------------------------------------------------------------------------

    def put_many(self, messages: Iterable[Message]) -> int:
        """Store messages in one transaction (durable when this returns); returns how many."""
        now = self._clock()
        rows = [
            (m.kind, KIND_PRIORITY.get(m.kind, 1), m.device, m.topic, bytes(m.payload), m.qos, int(m.retain), now)
            for m in messages
        ]
        if not rows:
            return 0
        added = sum(_size(r[3], r[4]) for r in rows)
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT INTO messages (kind, priority, device, topic, payload, qos, retain, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                self.count += len(rows)
                self.bytes += added
                self._enforce_bounds_locked()
                stored = self._sequence_locked()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self._recount_locked()
                raise
            self.enqueued += len(rows)
            self._stored = stored
            self._mark_write(stored, self.count)  # after the commit: the mark never runs ahead of the database
        return len(rows)

    def _enforce_bounds_locked(self) -> None:
        while self.count > self.max_messages or self.bytes > self.max_bytes:
            excess = max(1, self.count - self.max_messages)
            victims = self._db.execute(
                "SELECT id, priority, LENGTH(payload) + LENGTH(topic) FROM messages ORDER BY priority, id LIMIT ?",
                (excess if self.count > self.max_messages else 64,),
            ).fetchall()
            if not victims:
                return
            freed_bytes = 0
            dropped = []
            for row_id, priority, size in victims:
                dropped.append((row_id,))
                freed_bytes += size
                self.dropped["overflow_forecast" if priority == 0 else "overflow_alert"] += 1
                self.count -= 1
                self.bytes -= size
                if self.count <= self.max_messages and self.bytes <= self.max_bytes:
                    break
            self._db.executemany("DELETE FROM messages WHERE id = ?", dropped)
            log.warning("outbox full (%d messages, %d bytes): dropped the %d oldest lowest-priority messages", self.count, self.bytes, len(dropped))

    def _recount_locked(self) -> None:
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload) + LENGTH(topic)), 0) FROM messages").fetchone()
        self.count, self.bytes = int(row[0]), int(row[1])

    # -- delivery ------------------------------------------------------------------------------------------------

    def next_batch(self, after_id: int, limit: int) -> list[Stored]:
        """Up to `limit` stored messages with id > after_id, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, qos, retain FROM messages WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
        return [Stored(r[0], r[1], bytes(r[2]), int(r[3]), bool(r[4]), _size(r[1], r[2])) for r in rows]

    def acked(self, ids: list[int]) -> int:
        """Remove delivered messages (the broker acknowledged them); returns how many were still stored."""
        if not ids:
            return 0
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                removed = 0
                for row_id in ids:
                    row = db.execute("SELECT LENGTH(payload) + LENGTH(topic) FROM messages WHERE id = ?", (row_id,)).fetchone()
                    if row is None:  # dropped while in flight
                        continue
                    db.execute("DELETE FROM messages WHERE id = ?", (row_id,))
                    removed += 1
                    self.bytes -= int(row[0])
                if removed:
                    self._mark_write(self._stored, self.count - removed, sync=False)  # before the commit: never above it
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                self._recount_locked()
                raise
            self.count -= removed
            self.sent += len(ids)
        return removed

    def expire(self) -> int:
        """Drop messages older than max_age_s; returns how many."""
        horizon = self._clock() - self.max_age_s
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload) + LENGTH(topic)), 0) FROM messages WHERE created_at < ?", (horizon,)
            ).fetchone()
            n = int(row[0])
            if n:
                self._mark_write(self._stored, self.count - n, sync=False)
                self._db.execute("DELETE FROM messages WHERE created_at < ?", (horizon,))
                self.count -= n
                self.bytes -= int(row[1])
                self.dropped["expired"] += n
        if n:
            log.warning("outbox: dropped %d messages older than %.0f s, undelivered", n, self.max_age_s)
        return n

    def stats(self) -> dict:
        with self._lock:
            return {
                "queued": self.count,
                "queued_bytes": self.bytes,
                "enqueued": self.enqueued,
                "sent": self.sent,
                "dropped": sum(self.dropped.values()),
                "dropped_by_cause": dict(self.dropped),
                "recovered_at_start": self.recovered,
            }

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self._db.close()
            self._mark.close()


class Forwarder:
    """Hands stored messages to the broker link in order, at most `inflight` unacknowledged, and removes each
    from the outbox when its PUBACK arrives. Runs on its own thread; `on_ack` is called from paho's thread.

    A message handed to paho stays with paho across a reconnect (paho re-sends unacknowledged QoS 1 messages
    with the DUP flag when the connection comes back), so it is handed once per process; after a restart the
    outbox hands everything again from the oldest.
    """

    EXPIRE_EVERY_S = 60.0

    def __init__(self, outbox: Outbox, link, inflight: int = 20):
        from collections import deque

        self.outbox = outbox
        self.link = link
        self.inflight_limit = inflight
        self._acks: deque[int] = deque()  # mids acknowledged (appended by paho's thread)
        self._inflight: dict[int, int] = {}  # mid -> outbox row id; this thread only
        self._last_handed = 0  # highest row id handed to paho
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._idle = threading.Event()  # set whenever nothing is waiting (for stop)
        self.beat = time.monotonic()  # liveness for the watchdog

    def on_ack(self, mid: int) -> None:
        self._acks.append(mid)
        if not self._wake.is_set():  # every QoS 0 forecast is "acked" too: skip the lock and notify when already awake
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        next_expiry = time.monotonic()
        while not stop.is_set():
            self.beat = time.monotonic()
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._settle_acks()
                if self.link.connected.is_set():
                    self._hand_over()
                if time.monotonic() >= next_expiry:
                    self.outbox.expire()
                    next_expiry = time.monotonic() + self.EXPIRE_EVERY_S
            except sqlite3.Error:
                log.exception("outbox: database error; retrying")
                stop.wait(1.0)
            if not self._inflight and self.outbox.count == 0:
                self._idle.set()
            else:
                self._idle.clear()

    def wait_delivered(self, timeout: float) -> bool:
        """Wait (bounded) until the outbox is empty and nothing is in flight (at shutdown)."""
        self._wake.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._idle.wait(0.1) and self.outbox.count == 0:
                return True
            self._wake.set()
        return False

    def in_flight(self) -> int:
        return len(self._inflight)

    def _settle_acks(self) -> None:
        done = []
        while self._acks:
            row_id = self._inflight.pop(self._acks.popleft(), None)
            if row_id is not None:  # other mids belong to messages sent outside the outbox
                done.append(row_id)
        if done:
            self.outbox.acked(done)

    def _hand_over(self) -> None:
        room = self.inflight_limit - len(self._inflight)
        if room <= 0:
            return
        for message in self.outbox.next_batch(self._last_handed, room):
            mid = self.link.publish_tracked(message.topic, message.payload, qos=max(1, message.qos), retain=message.retain)
            if mid is None:  # paho's own queue is full: try again on the next round
                return
            self._inflight[mid] = message.id
            self._last_handed = message.id
