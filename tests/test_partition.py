"""Device-hash partitioning (agent/transport/partition.py): every device's window lives in exactly one daemon process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import AGENT_ID, REPO, healthy_rows, publish_rows, wait_until

from agent.transport.partition import PartitionFilter, partition_of

NAMES = [f"pump-{i:04d}" for i in range(500)] + ["gw/x", "Ünicode-dev", "a", "bench-00042"]


def test_every_device_belongs_to_exactly_one_partition():
    """For any process count, exactly one of the N filters owns each device."""
    for count in (1, 2, 3, 5):
        filters = [PartitionFilter(count, i) for i in range(count)]
        for name in NAMES:
            assert sum(f.owns(name) for f in filters) == 1, (name, count)


def test_partitions_share_the_devices_evenly_enough():
    """The hash spreads devices: with 2 processes neither gets less than 40 % of 500 devices."""
    owned = sum(partition_of(name, 2) == 0 for name in NAMES[:500])
    assert 200 <= owned <= 300


def test_hash_is_stable_across_processes_and_restarts():
    """Another interpreter (another hash seed) assigns every device to the same partition; the function is pinned."""
    code = "import json,sys; from agent.transport.partition import partition_of; print(json.dumps([partition_of(n, 3) for n in json.load(sys.stdin)]))"
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(NAMES), capture_output=True, text=True, env=env, check=True)
    assert json.loads(done.stdout) == [partition_of(n, 3) for n in NAMES]
    # crc32 of the UTF-8 name: a change of the function would move devices between running processes.
    assert [partition_of(n, 2) for n in ("pump-00", "pump-01", "gw/x")] == [1, 1, 0]
    assert [partition_of(n, 3) for n in ("pump-00", "pump-01", "gw/x")] == [2, 0, 0]


def test_partition_settings_are_validated():
    """partition.index must be below partition.count."""
    from pydantic import ValidationError

    from agent.config.settings import Settings

    with pytest.raises(ValidationError, match="partition.index"):
        Settings(partition={"count": 2, "index": 2})
    assert Settings(partition={"count": 2, "index": 1}).partition.index == 1


def test_two_partitioned_agents_split_the_devices_and_drop_foreign_ones_before_decoding(start_agent, make_probe, tmp_path):
    """Two agents with partition.count=2 keep disjoint device sets covering all devices; a broken payload of a
    foreign device is not even decoded (no rejection), while its owner rejects it."""
    agents = [
        start_agent(agent_id=f"{AGENT_ID}-{i}", partition={"count": 2, "index": i}, state={"directory": str(tmp_path / f"state-{i}")})
        for i in range(2)
    ]
    probe = make_probe(subscribe="edgecast/+/forecast")
    rows = healthy_rows(devices=6, rows=60)  # one forecast per device (the 60th reading fills the window)
    devices = sorted({device for device, _, _ in rows})
    publish_rows(probe, rows)
    forecasts = probe.collect("edgecast/+/forecast", len(devices), timeout=30)
    assert sorted(json.loads(m.payload)["device"] for m in forecasts) == devices
    owned = [set(agent.pipeline.devices()) for agent in agents]
    assert owned[0].isdisjoint(owned[1])
    assert owned[0] | owned[1] == set(devices)
    for i, agent in enumerate(agents):
        assert all(partition_of(d, 2) == i for d in owned[i])
        assert agent.stats()["processed"] == sum(1 for d, _, _ in rows if partition_of(d, 2) == i)

    victim = devices[0]
    owner = partition_of(victim, 2)
    probe.publish(f"sensors/{victim}/telemetry", b"{not json", qos=1)
    wait_until(lambda: agents[owner].stats()["rejected"].get("malformed_json", 0) == 1, timeout=10, message="the owner's rejection")
    assert agents[1 - owner].stats()["rejected"].get("malformed_json", 0) == 0
    assert agents[1 - owner].ingest.partition.foreign > 0
