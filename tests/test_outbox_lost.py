"""A lost -wal file loses queued alerts: noticed at the next open (count, ERROR log, fault on the errors topic).

The outbox's latest transactions live in `outbox.sqlite-wal` until a checkpoint. A daemon killed with alerts
queued leaves them there; when that file is then deleted, emptied or overwritten, SQLite opens the older main
file without a complaint. The watermark beside the database (`outbox.watermark`) must make that loss visible.
The killed daemon is a real process here (an Outbox in a child that exits without closing it).
"""

from __future__ import annotations

import logging
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import AGENT_ID, PREFIX, PYTHON, REPO

from agent.transport.outbox import Message, Outbox

QUEUED = 320


def crash_with(directory: Path, stored: int, acked: int = 0) -> None:
    """A process stores `stored` alerts, acknowledges the oldest `acked`, and dies without closing the outbox."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from agent.transport.outbox import Message, Outbox
        box = Outbox({str(directory)!r})
        for start in range(0, {stored}, 40):  # one transaction per worker batch, as the daemon does
            box.put_many([Message("alert", "{PREFIX}/pump-0/alert", b'{{"n":%d}}' % i + b" " * 200, "pump-0")
                          for i in range(start, min(start + 40, {stored}))])
        if {acked}:
            box.acked([m.id for m in box.next_batch(0, {acked})])
        os._exit(0)  # SIGKILL-like: no checkpoint, no close
    """)
    subprocess.run([PYTHON, "-c", script], check=True, cwd=REPO, timeout=60)
    assert (directory / "outbox.sqlite-wal").stat().st_size > 0, "the child must leave its transactions in the -wal file"


def lose_wal(directory: Path, how: str) -> None:
    wal = directory / "outbox.sqlite-wal"
    if how == "deleted":
        wal.unlink()
    elif how == "emptied":
        wal.write_bytes(b"")
    else:  # "overwritten"
        wal.write_bytes(os.urandom(wal.stat().st_size))


@pytest.mark.parametrize("how", ["deleted", "emptied", "overwritten"])
def test_a_lost_wal_is_reported_with_the_number_of_queued_messages_lost(tmp_path, caplog, how):
    """320 alerts queued, process killed, -wal deleted/emptied/overwritten: the reopen reports exactly 320 lost (ERROR)."""
    crash_with(tmp_path, QUEUED)
    lose_wal(tmp_path, how)
    with caplog.at_level(logging.ERROR, logger="agent.transport.outbox"):
        box = Outbox(tmp_path)
    try:
        assert box.count == 0, "the -wal file held every alert"
        assert box.lost_range == (QUEUED, QUEUED)
        assert box.lost is not None and box.lost.startswith(f"{QUEUED} queued message(s) lost")
        assert f"{QUEUED} queued message(s) lost" in caplog.text
    finally:
        box.close()
    again = Outbox(tmp_path)  # reported once: the watermark now matches the database
    assert again.lost is None
    again.close()


def test_delivered_messages_do_not_count_as_lost(tmp_path):
    """Of 320 stored, 100 acknowledged before the kill: losing the -wal reports the 220 still queued, not 320."""
    crash_with(tmp_path, QUEUED, acked=100)
    lose_wal(tmp_path, "deleted")
    box = Outbox(tmp_path)
    assert box.lost_range == (QUEUED - 100, QUEUED - 100)
    assert box.lost.startswith(f"{QUEUED - 100} queued message(s) lost")
    box.close()


def test_a_deleted_database_is_reported_too(tmp_path):
    """The whole database gone (outbox.sqlite and its -wal/-shm) with alerts queued: the fresh one reports them lost."""
    crash_with(tmp_path, QUEUED)
    for path in tmp_path.glob("outbox.sqlite*"):
        path.unlink()
    box = Outbox(tmp_path)
    assert box.lost_range == (QUEUED, QUEUED)
    box.close()


def test_no_loss_is_reported_when_nothing_was_lost(tmp_path):
    """Clean close/reopen, a kill with the -wal kept, everything delivered before the -wal went: nothing reported."""
    clean = tmp_path / "clean"
    box = Outbox(clean)
    box.put_many([Message("alert", f"{PREFIX}/p/alert", b"{}", "p") for _ in range(50)])
    box.acked([m.id for m in box.next_batch(0, 20)])
    box.close()
    assert not (clean / "outbox.sqlite-wal").exists() or (clean / "outbox.sqlite-wal").stat().st_size == 0
    box = Outbox(clean)
    assert (box.lost, box.recovered) == (None, 30)
    box.close()

    killed = tmp_path / "killed"
    crash_with(killed, QUEUED)
    box = Outbox(killed)  # the -wal is there: SQLite recovers every alert
    assert (box.lost, box.recovered) == (None, QUEUED)
    box.close()

    delivered = tmp_path / "delivered"
    crash_with(delivered, QUEUED, acked=QUEUED)
    lose_wal(delivered, "deleted")
    box = Outbox(delivered)
    assert box.lost is None, box.lost
    box.close()


@pytest.mark.mqtt
def test_daemon_reports_a_lost_wal_on_the_errors_topic(start_daemon, subscriber, tmp_path):
    """The daemon started on an outbox whose -wal was deleted reports the lost alerts as a fault (errors topic + log)."""
    state = tmp_path / "state"
    crash_with(state, QUEUED)
    lose_wal(state, "deleted")
    daemon = start_daemon(env={"EDGECAST_STATE__DIRECTORY": str(state)})
    daemon.wait_online(subscriber)
    report = subscriber.expect(f"{PREFIX}/agent/{AGENT_ID}/errors", lambda m: m.json()["reason"] == "outbox_corrupt", timeout=15).json()
    assert report["detail"].startswith(f"{QUEUED} queued message(s) lost"), report
    assert report["topic"] is None and report["suppressed"] == 0
    log = daemon.log()
    assert "ERROR" in log and f"{QUEUED} queued message(s) lost" in log, log
