"""Which model serves which device: the `[[models]]` list (or the single `[model]`) as plans the daemon runs.

A plan is one model's effective settings: the shared sections with the model's own `[models.window]`,
`[models.detect]` and `[models.inference]` and its input templates put in, so that every part below the
composition root keeps reading `settings.window`, `settings.model`, ... as it did with one model.

Two models must never both claim a device: the settings refuse entries whose input topics can be the same
topic and whose device patterns can name the same device (`patterns_overlap`), so routing needs no tie-break.
This module imports nothing from pydantic (the daemon runs on a Snapshot of the settings).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any

SINGLE_MODEL_NAME = "default"  # the name of the single [model] section, a list of one


@dataclass(frozen=True)
class ModelPlan:
    """One model of the daemon: its name, its effective settings and the devices it serves."""

    name: str
    settings: Any  # Settings or its Snapshot, with this model's sections in place
    devices: tuple[str, ...]  # device-name patterns (* and ?)
    rollout_topic: str
    single: bool  # the only model: file names and topics as before there were several

    def serves(self, device: str) -> bool:
        return any(fnmatchcase(device, pattern) for pattern in self.devices)


def model_plans(settings: Any) -> list[ModelPlan]:
    """The models to run, in configuration order; the single `[model]` section when `[[models]]` is empty."""
    entries = list(settings.models)
    if not entries:
        return [ModelPlan(SINGLE_MODEL_NAME, settings, ("*",), settings.rollout.topic, single=True)]
    plans = []
    for entry in entries:
        topics = settings.topics.model_copy(update={
            "telemetry": entry.telemetry or settings.topics.telemetry,
            "sensor": settings.topics.sensor if entry.sensor is None else (entry.sensor or None),
        })
        model = settings.model.model_copy(update={name: getattr(entry, name) for name in _MODEL_FIELDS})
        effective = settings.model_copy(update={
            "model": model, "topics": topics, "models": [],
            "window": entry.window or settings.window,
            "detect": entry.detect or settings.detect,
            "inference": entry.inference or settings.inference,
        })
        topic = entry.rollout_topic or f"{settings.rollout.topic}/{entry.name}"
        plans.append(ModelPlan(entry.name, effective, tuple(entry.devices), topic, single=len(entries) == 1))
    return plans


_MODEL_FIELDS = ("path", "intra_op_threads", "public_key", "public_key_file", "require_signature", "reload_poll_s")


def input_filters(telemetry: str, sensor: str | None) -> list[str]:
    """The MQTT filters (placeholder levels as '+') of a model's input templates."""
    templates = [telemetry] + ([sensor] if sensor else [])
    return ["/".join("+" if "{" in level else level for level in template.split("/")) for template in templates]


def filters_overlap(a: str, b: str) -> bool:
    """True when some topic matches both filters ('+' levels only; a level with a placeholder may match anything)."""
    x, y = a.split("/"), b.split("/")
    return len(x) == len(y) and all(p == q or p == "+" or q == "+" for p, q in zip(x, y))


def patterns_overlap(a: str, b: str) -> bool:
    """True when some device name matches both patterns (`*`: any run of characters, `?`: one character)."""

    @lru_cache(maxsize=None)
    def meet(i: int, j: int) -> bool:
        if i == len(a) and j == len(b):
            return True
        if i < len(a) and a[i] == "*":
            return meet(i + 1, j) or (j < len(b) and (meet(i, j + 1) if b[j] != "*" else meet(i, j + 1) or meet(i + 1, j)))
        if j < len(b) and b[j] == "*":
            return meet(i, j + 1) or (i < len(a) and meet(i + 1, j))
        if i == len(a) or j == len(b):
            return False
        return (a[i] == b[j] or a[i] == "?" or b[j] == "?") and meet(i + 1, j + 1)

    return meet(0, 0)


def overlap_problem(settings: Any) -> str | None:
    """Why two configured models could both claim one device, or None (the check of `check-config`)."""
    entries = list(settings.models)
    for k, first in enumerate(entries):
        first_filters = input_filters(first.telemetry or settings.topics.telemetry,
                                      settings.topics.sensor if first.sensor is None else first.sensor)
        for second in entries[k + 1:]:
            second_filters = input_filters(second.telemetry or settings.topics.telemetry,
                                           settings.topics.sensor if second.sensor is None else second.sensor)
            if not any(filters_overlap(f, g) for f in first_filters for g in second_filters):
                continue
            both = [(p, q) for p in first.devices for q in second.devices if patterns_overlap(p, q)]
            if both:
                p, q = both[0]
                return (f"models {first.name!r} and {second.name!r} can both claim one device: their input topics overlap and "
                        f"device patterns {p!r} and {q!r} can name the same device; give each model device patterns "
                        f"that exclude the other's (e.g. 'pump-*' and 'fan-*') or its own input topic")
    return None
