"""The outbox on its own: durable across reopen, bounded with the stated drop policy, every message accounted for."""

from __future__ import annotations

import sqlite3

import pytest

from agent.transport.outbox import Message, Outbox


def alert(i: int, device: str = "pump-00") -> Message:
    return Message("alert", f"edgecast/{device}/alert", b'{"alert":%d}' % i, device)


def forecast(i: int, device: str = "pump-00") -> Message:
    return Message("forecast", f"edgecast/{device}/forecast", b'{"forecast":%d}' % i, device)


def payloads(box: Outbox) -> list[bytes]:
    return [m.payload for m in box.next_batch(0, 10_000)]


def test_messages_survive_a_reopen_in_order_and_leave_only_when_acked(tmp_path):
    """Stored messages come back after a reopen, oldest first; acked ones are gone, the rest stay."""
    box = Outbox(tmp_path)
    box.put_many([alert(i) for i in range(5)])
    first = box.next_batch(0, 2)
    assert box.acked([m.id for m in first]) == 2
    box.close()
    again = Outbox(tmp_path)
    assert again.recovered == 3
    assert payloads(again) == [alert(i).payload for i in (2, 3, 4)]
    assert again.next_batch(first[-1].id, 10)[0].payload == alert(2).payload
    with sqlite3.connect(tmp_path / "outbox.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again.close()


def test_overflow_drops_forecasts_first_then_oldest_alerts(tmp_path):
    """Over max_messages: forecasts go first (oldest first), then alerts (oldest first); drops are counted by cause."""
    box = Outbox(tmp_path, max_messages=10)
    box.put_many([forecast(0), alert(0), forecast(1), alert(1), forecast(2)])
    box.put_many([alert(i) for i in range(2, 9)])  # 12 stored -> 2 forecasts dropped
    assert payloads(box) == [alert(0).payload, alert(1).payload, forecast(2).payload] + [alert(i).payload for i in range(2, 9)]
    box.put_many([alert(9), alert(10)])  # the last forecast, then the oldest alert
    assert payloads(box) == [alert(i).payload for i in range(1, 11)]
    stats = box.stats()
    assert stats["dropped_by_cause"] == {"overflow_forecast": 3, "overflow_alert": 1, "expired": 0}
    assert stats["enqueued"] == stats["queued"] + stats["sent"] + stats["dropped"] == 14
    box.close()


def test_byte_bound_and_age_bound(tmp_path):
    """max_bytes drops the same way as max_messages; messages older than max_age_s expire, counted."""
    now = [1000.0]
    box = Outbox(tmp_path, max_bytes=65536, max_age_s=60, clock=lambda: now[0])
    big = [Message("alert", "edgecast/p/alert", bytes([65 + i]) * 20000, "p") for i in range(4)]
    box.put_many(big)  # 80 kB > 64 KiB: the oldest goes
    assert [m.payload[:1] for m in box.next_batch(0, 10)] == [b"B", b"C", b"D"]
    assert box.bytes <= 65536
    now[0] += 30
    box.put_many([alert(1)])
    now[0] += 45  # the first three are 75 s old, the last 45 s
    assert box.expire() == 3
    assert payloads(box) == [alert(1).payload]
    assert box.stats()["dropped_by_cause"] == {"overflow_forecast": 0, "overflow_alert": 1, "expired": 3}
    box.close()


@pytest.mark.parametrize("content", [b"", b"SQLite format 3\x00" + b"\x00" * 50, b"not a database at all" * 100])
def test_an_unreadable_file_is_moved_aside(tmp_path, content):
    """A file SQLite cannot use is renamed outbox.sqlite.corrupt-<time>; a fresh, working outbox replaces it."""
    (tmp_path / "outbox.sqlite").write_bytes(content)
    box = Outbox(tmp_path)
    if not content:  # an empty file is a valid empty database for SQLite: nothing to move
        assert box.moved_aside is None
    else:
        assert box.moved_aside is not None and box.moved_aside.exists()
        assert box.moved_aside.read_bytes() == content
        assert box.corruption
    box.put_many([alert(1)])
    assert payloads(box) == [alert(1).payload]
    box.close()
