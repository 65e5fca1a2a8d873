"""The real agent in a subprocess whose worker is held at its first batch until SIGUSR1 (fault-injection helper).

    python tests/gated_agent.py STATS.json     (settings from EDGECAST_* like `python -m agent run`)

It writes Agent.stats() (plus "connected") to STATS.json every 50 ms, so a test can wait for exact counts
(all samples accepted, all processed, outbox depth) before it kills the broker or SIGKILLs this process.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.app import Agent, configure_logging  # noqa: E402
from agent.config.settings import load_settings  # noqa: E402


def main() -> int:
    stats_path = Path(sys.argv[1])
    settings = load_settings()
    configure_logging(settings.log.level)
    release = threading.Event()
    stop = threading.Event()
    signal.signal(signal.SIGUSR1, lambda *_: release.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    agent = Agent(settings)
    agent.start()
    agent.engine.inline_allowed = False  # every batch through the worker (a light load's batches run on the MQTT thread)
    real_prepare = agent.pipeline.prepare

    def held(samples):
        release.wait()
        return real_prepare(samples)

    agent.pipeline.prepare = held
    while not stop.wait(0.05):
        stats = agent.stats()
        stats["connected"] = agent.link.connected.is_set()
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, stats_path)
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
