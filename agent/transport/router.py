"""From an input message to the model that serves its device: parse it with that model's ingest, tag its samples.

With one model every JSON message goes straight to its ingest (the path the daemon always had). With several,
the topic's {device} is matched against each model's input templates and device patterns, in configuration
order; the settings guarantee at most one model claims a device (agent/config/models.py), and the answer is
cached per topic. A device no model serves is rejected as `no_model`: reported once on the errors topic, and
every later message of it counted, so it is never dropped silently nor reported in a storm. Sparkplug B
messages go to the Sparkplug input, whose rebirth requests are sent through `send_command`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.core.events import Rejected, Sample

if TYPE_CHECKING:
    from agent.core.runtime import ModelRuntime
    from agent.transport.errors import ErrorReporter

OWNER_CACHE_MAX = 200_000  # topics remembered with their model (twice ingest.max_devices' default); then forgotten
NO_MODEL_REPORTED_MAX = 10_000  # devices whose no_model was reported; beyond it reported again after a reset


class Router:
    """`parse(topic, payload, now)` -> samples tagged with their model's index; raises Rejected."""

    def __init__(self, runtimes: list[ModelRuntime], errors: ErrorReporter, sparkplug=None,
                 send_command: Callable[[str, bytes], None] | None = None):
        self.runtimes = runtimes
        self.errors = errors
        self.sparkplug = sparkplug  # agent.transport.sparkplug.SparkplugInput (one model only)
        self.send_command = send_command
        self._owner: dict[str, tuple[int, str]] = {}  # topic -> (model index or -1: none, device)
        self._no_model_reported: set[str] = set()
        if sparkplug is not None:
            self.parse = self._parse_with_sparkplug
        elif len(runtimes) == 1:
            self.parse = runtimes[0].ingest.parse  # one model: no routing at all
        else:
            self.parse = self._parse_routed

    def subscriptions(self) -> list[str]:
        """Every model's input filters (a filter covered by another only once), then Sparkplug's."""
        from agent.transport.ingest import _covers

        filters = list(dict.fromkeys(f for runtime in self.runtimes for f in runtime.ingest.subscriptions()))
        filters = [f for f in filters if not any(g != f and _covers(g, f) for g in filters)]
        return filters + (self.sparkplug.subscriptions() if self.sparkplug is not None else [])

    def _parse_routed(self, topic: str, payload: bytes, now: float) -> list[Sample]:
        owner = self._owner.get(topic)
        if owner is None:
            owner = self._find_owner(topic)  # Rejected for a topic no template fits: not cached (hostile input)
            if len(self._owner) >= OWNER_CACHE_MAX:
                self._owner.clear()
            self._owner[topic] = owner
        index, device = owner
        if index < 0:
            self._no_model(topic, device)
            return []
        samples = self.runtimes[index].ingest.parse(topic, payload, now)
        for sample in samples:
            sample.model = index
        return samples

    def _find_owner(self, topic: str) -> tuple[int, str]:
        device = None
        for index, runtime in enumerate(self.runtimes):
            found = runtime.ingest.try_match(topic)  # Rejected for a device name no topic may carry
            if found is None:
                continue
            name = found[1]
            if runtime.plan.serves(name):
                return index, name
            device = name
        if device is None:
            templates = [route.template for runtime in self.runtimes for route in runtime.ingest.routes]
            raise Rejected("unknown_topic", f"topic {topic[:200]!r} matches none of {list(dict.fromkeys(templates))}")
        return -1, device

    def _no_model(self, topic: str, device: str) -> None:
        if device in self._no_model_reported:
            self.errors.count("no_model")
            return
        if len(self._no_model_reported) >= NO_MODEL_REPORTED_MAX:
            self._no_model_reported.clear()
        self._no_model_reported.add(device)
        patterns = {runtime.name: list(runtime.plan.devices) for runtime in self.runtimes}
        self.errors.report("no_model", f"device {device!r} matches no model's devices {patterns}; its readings are dropped "
                           "(reported once per device, every message counted)", topic=topic, device=device)

    def _parse_with_sparkplug(self, topic: str, payload: bytes, now: float) -> list[Sample]:
        if not topic.startswith("spBv1.0/"):
            return self.runtimes[0].ingest.parse(topic, payload, now)
        return self._sparkplug_samples(topic, payload, now)

    def _sparkplug_samples(self, topic: str, payload: bytes, received_at: float) -> list[Sample]:
        """One Sparkplug B message: its rejections reported (as JSON input's are), its rebirth requests sent, its
        gaps as window restarts (in order, before its readings), its readings for the devices this process serves."""
        result = self.sparkplug.handle(topic, payload, received_at)
        for reason, device, detail in result.rejections:
            self.errors.report(reason, detail, topic=topic, device=device)
        if result.commands and self.send_command is not None:
            for command_topic, body in result.commands:
                self.send_command(command_topic, body)
        samples = [Sample(device, received_at, None, received_at) for device in result.gaps]
        ingest = self.runtimes[0].ingest
        partition = ingest.partition
        for sample in result.samples:
            if partition.active and not partition.owns(sample.device):
                continue
            if ingest.device_gate is not None and not ingest.device_gate(sample.device, received_at):
                self.errors.report("device_limit", ingest.device_limit_detail(), topic=topic, device=sample.device)
                continue
            samples.append(sample)
        return samples
