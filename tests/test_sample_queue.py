"""The ingest queue's batched get: it waits (a bounded time) for a fuller batch, and never longer than asked."""

from __future__ import annotations

import threading
import time

from agent.app import SampleQueue


def test_a_lone_item_is_returned_after_the_linger_at_the_latest():
    """With fewer items than `fill`, get_many returns what is there once `linger` has passed."""
    q = SampleQueue()
    q.put_all_nowait([1])
    started = time.monotonic()
    taken = q.get_many(100, timeout=1.0, fill=10, linger=0.05)
    waited = time.monotonic() - started
    assert taken == [1]
    assert 0.05 <= waited < 2.0


def test_the_linger_counts_from_the_oldest_items_arrival():
    """An item that has already waited `linger` (its taker was busy) is returned at once, not after another linger."""
    q = SampleQueue()
    q.put_all_nowait([1])
    threading.Event().wait(2.0)  # the taker is elsewhere for as long as the linger
    started = time.monotonic()
    assert q.get_many(100, timeout=1.0, fill=10, linger=2.0) == [1]
    assert time.monotonic() - started < 1.0


def test_the_linger_ends_as_soon_as_the_batch_is_full():
    """A lingering get_many returns as soon as `fill` items are queued, long before its linger runs out."""
    q = SampleQueue()
    q.put_all_nowait([0])
    feeder = threading.Thread(target=lambda: [q.put_all_nowait([i]) for i in range(1, 8)])
    got: list = []
    getter = threading.Thread(target=lambda: got.append(q.get_many(100, timeout=1.0, fill=8, linger=60.0)))
    started = time.monotonic()
    getter.start()
    feeder.start()
    getter.join(30)
    feeder.join(30)
    assert not getter.is_alive(), "get_many waited out its 60 s linger although the batch was full"
    assert time.monotonic() - started < 30
    assert got[0] == list(range(8))


def test_no_linger_when_the_batch_is_already_there_or_not_asked_for():
    """A full batch, or linger 0, is returned at once, in order, at most `limit` items."""
    q = SampleQueue()
    q.put_all_nowait(list(range(20)))
    started = time.monotonic()
    assert q.get_many(16, timeout=1.0, fill=8, linger=60.0) == list(range(16))
    assert q.get_many(16, timeout=1.0, fill=8, linger=0.0) == [16, 17, 18, 19]
    assert time.monotonic() - started < 5.0


def test_an_empty_queue_gives_nothing_after_the_timeout():
    """With nothing queued, get_many returns [] after `timeout`; the linger only starts with a first item."""
    q = SampleQueue()
    started = time.monotonic()
    assert q.get_many(16, timeout=0.05, fill=8, linger=60.0) == []
    assert time.monotonic() - started < 5.0


def test_a_full_queue_room_is_signalled_after_a_lingering_get():
    """Items taken after a linger free their room: a producer blocked on a full queue gets in."""
    q = SampleQueue(maxsize=2)
    q.put_all_nowait([1, 2])
    done = threading.Event()

    def producer():
        q.put(3, timeout=30)
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert q.get_many(8, timeout=1.0, fill=8, linger=0.02) == [1, 2]
    assert done.wait(30), "the producer was not told that room was freed"
    thread.join(30)
    assert q.get_many(8, timeout=1.0) == [3]
