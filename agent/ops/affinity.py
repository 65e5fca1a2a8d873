"""Where the daemon's threads run: the model thread on a CPU of its own, every other thread on the rest.

onnxruntime releases the GIL, so the model thread computes while the Python threads (network, worker, publisher)
take turns on the GIL; only one of them runs Python at a time, so one core is enough for them. Left to the
scheduler, they (and the broker, the kernel's network work) also land on the model's core, which then waits for
its core back and finds its caches cold: on 2 cores the model thread alone on one gave +6% readings/s
(docs/benchmarks.md). Linux only (`os.sched_setaffinity` on a thread id); elsewhere `auto` does nothing.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

Setting = str | int  # inference.model_cpu: "auto", "off" or a CPU number


@dataclass(frozen=True)
class Placement:
    model_cpu: int
    others: frozenset[int]  # CPUs of every other thread of the daemon

    def describe(self) -> str:
        return f"model thread on CPU {self.model_cpu}, the other threads on CPU {_ranges(self.others)}"


def supported() -> bool:
    return hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")


def usable_cpus() -> frozenset[int]:
    """The CPUs this thread may run on (a systemd CPUAffinity= or a cpuset narrows them)."""
    return frozenset(os.sched_getaffinity(0)) if supported() else frozenset()


def placement(setting: Setting, usable: frozenset[int], partition: tuple[int, int] = (1, 0), intra_op_threads: int = 1) -> Placement | None:
    """The placement for `inference.model_cpu`, or None (no pinning); `partition` is (count, index). Raises
    ValueError for a CPU that cannot be used.

    auto: the model threads of the `count` partitions take the last `count` CPUs, one each, and every other thread
    of every partition shares the CPUs before them; only with at least two CPUs per partition (on 2 cores, two
    partitions crossed this way ran 10% slower than unpinned) and without intra-op threads (then the model runs
    on several cores of onnxruntime's pool)."""
    if setting == "off":
        return None
    cpus = sorted(usable)
    count, index = partition
    if setting == "auto":
        if len(cpus) < 2 * count or intra_op_threads != 1:
            return None
        return Placement(cpus[-1 - index], frozenset(cpus[: len(cpus) - count]))
    if not supported():
        raise ValueError(f"inference.model_cpu = {setting}: thread CPU affinity is not supported on this system (use auto or off)")
    if setting not in usable:
        raise ValueError(f"inference.model_cpu = {setting} is not a CPU this process may use ({_ranges(usable)}); "
                         f"set one of those, auto or off")
    if len(cpus) < 2:
        return None  # the only CPU: nothing to keep apart
    return Placement(int(setting), frozenset(usable) - {int(setting)})


def pin(thread: threading.Thread, cpus: frozenset[int]) -> bool:
    """Bind a running thread to `cpus`; False when it has ended or the system refused."""
    tid = thread.native_id
    if tid is None or not thread.is_alive():
        return False
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError:  # the thread ended meanwhile, or a cpuset changed under us
        return False
    return True


def name_os_thread(name: str) -> None:
    """Give the calling thread its name in the kernel too (top -H, ps -L, /proc/PID/task/*/comm show it; 15
    characters); Linux only, a no-op elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.removeprefix("edgecast-")[:15].encode(), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def thread_cpus(thread: threading.Thread) -> frozenset[int]:
    """The CPUs a running thread may use (for tests and logs)."""
    return frozenset(os.sched_getaffinity(thread.native_id or 0))


def _ranges(cpus: frozenset[int] | set[int]) -> str:
    """{0, 1, 2, 5} -> '0-2,5'"""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][-1] + 1:
            runs[-1].append(cpu)
        else:
            runs.append([cpu])
    return ",".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
