"""inference.model_cpu: the model thread on a CPU of its own, the daemon's other threads on the rest."""

from __future__ import annotations

import threading

import pytest

from agent.ops import affinity
from agent.ops.affinity import Placement, placement


def test_auto_gives_the_model_thread_the_last_cpu_and_the_other_threads_the_rest():
    """auto on 2+ CPUs: the model thread alone on the last usable CPU, every other thread on the ones before it."""
    assert placement("auto", frozenset({0, 1})) == Placement(1, frozenset({0}))
    assert placement("auto", frozenset({2, 5, 7})) == Placement(7, frozenset({2, 5}))  # a narrowed set (systemd CPUAffinity=)


def test_auto_pins_nothing_where_a_cpu_of_its_own_would_cost_more_than_it_gives():
    """auto leaves threads alone on one CPU, with intra-op threads, and with fewer than 2 CPUs per partition."""
    assert placement("auto", frozenset({0})) is None
    assert placement("auto", frozenset({0, 1}), intra_op_threads=2) is None
    assert placement("auto", frozenset({0, 1}), partition=(2, 0)) is None
    assert placement("off", frozenset(range(8))) is None


def test_auto_gives_each_partition_its_own_model_cpu_and_shares_the_rest():
    """Partitions side by side: distinct model CPUs (the last `count`), the other threads of all on the CPUs before."""
    cpus = frozenset(range(4))
    first, second = placement("auto", cpus, partition=(2, 0)), placement("auto", cpus, partition=(2, 1))
    assert (first.model_cpu, second.model_cpu) == (3, 2)
    assert first.others == second.others == frozenset({0, 1})


def test_an_explicit_cpu_is_used_and_one_the_process_cannot_use_is_refused_naming_the_usable_ones():
    """A CPU number is the model thread's; one outside the usable set is a start error that lists the usable CPUs."""
    assert placement(0, frozenset({0, 1})) == Placement(0, frozenset({1}))
    with pytest.raises(ValueError, match=r"inference.model_cpu = 9 is not a CPU this process may use \(0-2,5\)"):
        placement(9, frozenset({0, 1, 2, 5}))


@pytest.mark.mqtt
def test_a_running_agent_puts_its_model_thread_alone_on_a_cpu(start_agent):
    """Started with the default (auto), the model thread runs on one CPU and the worker, publisher and network thread on the others."""
    usable = affinity.usable_cpus()
    agent = start_agent()
    network = agent.link.network_thread()
    threads = [agent.engine.worker, agent.engine.publisher_thread, network]
    expected = placement("auto", usable)
    if expected is None:  # a 1-CPU machine: nothing is pinned
        assert all(affinity.thread_cpus(t) == usable for t in [agent.engine.model_thread, *threads])
        return
    assert affinity.thread_cpus(agent.engine.model_thread) == {expected.model_cpu}
    for thread in threads:
        assert affinity.thread_cpus(thread) == expected.others, thread.name
    assert affinity.thread_cpus(threading.main_thread()) == usable  # the embedding process is left as it was


@pytest.mark.mqtt
def test_an_unusable_model_cpu_stops_the_start_before_any_thread_runs(agent_settings):
    """inference.model_cpu naming a CPU the process cannot use raises at start, before a thread or connection exists."""
    from agent.app import Agent

    unusable = max(affinity.usable_cpus()) + 1
    agent = Agent(agent_settings(inference={"model_cpu": unusable}))
    before = threading.active_count()
    with pytest.raises(ValueError, match=f"inference.model_cpu = {unusable} is not a CPU this process may use"):
        agent.start()
    assert threading.active_count() == before and agent.link is None
