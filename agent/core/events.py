"""The values that flow between the daemon's stages (plain dataclasses, and ForecastValues, a read-only view of a
forecast's numbers in its batch array).

ingest ──Sample──► pipeline (windows → model → detector) ──Forecast / AlertEvent / Rejection──► sinks
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

# Fixed vocabulary of rejection reasons: counter keys and the `reason` field on the errors topic.
REJECTION_REASONS = (
    "unknown_topic",
    "oversized_payload",
    "invalid_utf8",
    "malformed_json",
    "wrong_type",
    "missing_feature",
    "unknown_feature",
    "non_finite",
    "bad_timestamp",
    "timestamp_out_of_range",
    "late_sample",
    "queue_full",
    "out_of_range",
    "device_limit",
    "no_model",  # several models ([[models]]): the device matches none of their device patterns
    # Sparkplug B input (agent/transport/sparkplug.py)
    "sparkplug_decode",
    "sparkplug_no_birth",
    "sparkplug_unknown_alias",
    "sparkplug_seq_gap",
)


class Rejected(Exception):
    """Raised by the ingest stage for input it will not accept; carries a reason from REJECTION_REASONS."""

    def __init__(self, reason: str, detail: str, device: str | None = None):
        assert reason in REJECTION_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.device = device


@dataclass(slots=True)
class Sample:
    """Validated readings of one device at one time; `values` may hold a subset of the features (per-sensor form).
    `values` None marks a gap the input knows of (a Sparkplug death or sequence gap): the device's window starts
    over, as after a long silence."""

    device: str
    ts: float  # unix seconds
    values: dict[str, float] | None
    received_at: float  # agent clock when it arrived (unix seconds)
    ack: int = 0  # mqtt.at_least_once: the packet id to acknowledge once this sample is processed (its message's last)
    model: int = 0  # the index of the model that serves the device (agent/transport/router.py)


@dataclass(slots=True)
class Rejection:
    """Input that was refused after parsing (e.g. a late sample), reported like an ingest rejection."""

    reason: str
    detail: str
    device: str | None = None
    topic: str | None = None


class ForecastValues(Mapping):
    """target -> its H forecasts (a list of floats), read from row `row` of a batch's forecast array (N, T, H)
    without copying: the pipeline makes thousands a second, and the encoder writes a whole batch's numbers
    from the array at once. Compares equal to the same dict."""

    __slots__ = ("targets", "batch", "row")

    def __init__(self, targets: tuple[str, ...], batch, row: int):
        self.targets, self.batch, self.row = targets, batch, row

    def __getitem__(self, target: str) -> list[float]:
        try:
            return self.batch[self.row, self.targets.index(target)].tolist()
        except ValueError:
            raise KeyError(target) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.targets)

    def __len__(self) -> int:
        return len(self.targets)

    def __repr__(self) -> str:
        return repr(dict(self))


@dataclass(slots=True)
class Forecast:
    device: str
    ts: float  # timestamp of the last slot in the input window
    period_s: float
    horizon_ts: list[float]
    values: Mapping[str, list[float]]  # target -> H forecasts in original units (a dict or ForecastValues)
    completeness: float  # share of window slots that were observed, not imputed
    staleness_s: float
    # (H, T) the input window's scale in original units, for a bundle with normalized prediction intervals
    # (agent/core/intervals.py: band = forecast + quantile x scale); None: fixed bands, or no intervals.
    interval_scale: object = None
    interval_multiplier: object = None  # (K, H, T) the adaptive intervals' multiplier of this device's bands, or None


@dataclass(slots=True)
class FeatureDeviation:
    name: str
    expected: float
    observed: float
    z: float


@dataclass(slots=True)
class AlertEvent:
    alert_id: str
    device: str
    state: str  # "new" | "update" | "end"
    severity: str  # "warning" | "critical"
    anomaly_score: float
    score: float
    threshold: float
    ts: float
    started_at: float
    ended_at: float | None
    features: list[FeatureDeviation] = field(default_factory=list)
