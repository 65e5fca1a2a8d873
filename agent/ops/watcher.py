"""The model watcher thread: reload on SIGHUP, on a changed bundle folder, and when a rollout arrives.

A folder counts as changed once its files changed and then stayed the same for one poll (a copy in progress is
not loaded half-written). The new bundle is loaded and verified here, beside the running one, for each model
on its own (agent/core/runtime.py); the worker swaps it in between two batches.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.core.runtime import ModelRuntime


class ModelWatcher:
    """`run()` is the thread's body; `request_reload()` (SIGHUP) and `wake()` (a rollout arrived) from any thread."""

    def __init__(self, runtimes: list[ModelRuntime], stop: threading.Event):
        self.runtimes = runtimes
        self._stop = stop
        self._wake = threading.Event()
        self._sighup = threading.Event()
        polls = [r.settings.model.reload_poll_s for r in runtimes if r.settings.model.reload_poll_s > 0]
        self.poll_s = min(polls) if polls else 0.0

    def request_reload(self) -> None:
        """Load every model's folder again (SIGHUP)."""
        self._sighup.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        seen = {r.name: (r.fingerprint(), r.model_dir) for r in self.runtimes}
        candidate: dict[str, tuple | None] = {r.name: None for r in self.runtimes}
        while not self._stop.is_set():
            requested = self._wake.wait(self.poll_s if self.poll_s > 0 else 1.0)
            if self._stop.is_set():
                return
            if requested:
                self._wake.clear()
                sighup = self._sighup.is_set()
                self._sighup.clear()
                for runtime in self.runtimes:
                    runtime.apply_latest_rollout()
                    if sighup:
                        runtime.reload("SIGHUP")
                    seen[runtime.name], candidate[runtime.name] = (runtime.fingerprint(), runtime.model_dir), None
                continue
            for runtime in self.runtimes:
                if runtime.settings.model.reload_poll_s <= 0:
                    continue
                fingerprint, folder = seen[runtime.name]
                if runtime.model_dir != folder:  # a rollout swapped folders: watch the new one from now on
                    seen[runtime.name], candidate[runtime.name] = (runtime.fingerprint(), runtime.model_dir), None
                    continue
                current = runtime.fingerprint()
                if current == fingerprint:
                    candidate[runtime.name] = None
                elif current == candidate[runtime.name]:  # changed, then stable for a poll: the copy is complete
                    seen[runtime.name], candidate[runtime.name] = (current, folder), None
                    runtime.reload("model folder changed")
                else:
                    candidate[runtime.name] = current
