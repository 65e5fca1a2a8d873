"""JSON encoding of everything the agent publishes (docs/contracts.md, "Topics and payloads").

Compact separators and rounded floats keep payloads small; non-finite numbers become null, never NaN.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from .events import AlertEvent, Forecast

FORECAST_DIGITS = 5  # significant digits of forecast values: far below any sensor's noise
SCORE_DIGITS = 4
MAX_DETAIL_CHARS = 300
MAX_TOPIC_CHARS = 200


def agent_version() -> str:
    """Version of the installed edgecast distribution (the source tree's package version as a fallback)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgecast")
    except PackageNotFoundError:
        import agent

        return str(getattr(agent, "__version__", "0.0.0+unknown"))


def _sig(value: float, digits: int) -> float | None:
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def _ts(value: float) -> int | float:
    """Unix seconds: an int when whole (the usual case on a fixed sampling grid), else milliseconds precision."""
    value = float(value)
    return int(value) if value.is_integer() else round(value, 3)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _model(name: str, version: str) -> dict[str, str]:
    return {"name": name, "version": version}


def forecast(fc: Forecast, model_name: str, model_version: str) -> bytes:
    return _dumps(
        {
            "device": fc.device,
            "model": _model(model_name, model_version),
            "ts": _ts(fc.ts),
            "period_s": _ts(fc.period_s),
            "horizon_ts": [_ts(t) for t in fc.horizon_ts],
            "forecast": {target: [_sig(v, FORECAST_DIGITS) for v in values] for target, values in fc.values.items()},
            "completeness": round(float(fc.completeness), 4),
            "staleness_s": round(float(fc.staleness_s), 3),
        }
    )


def alert(event: AlertEvent, model_name: str, model_version: str) -> bytes:
    return _dumps(
        {
            "alert_id": event.alert_id,
            "device": event.device,
            "state": event.state,
            "severity": event.severity,
            "anomaly_score": _sig(event.anomaly_score, SCORE_DIGITS),
            "score": _sig(event.score, SCORE_DIGITS),
            "threshold": _sig(event.threshold, SCORE_DIGITS),
            "ts": _ts(event.ts),
            "started_at": _ts(event.started_at),
            "ended_at": None if event.ended_at is None else _ts(event.ended_at),
            "features": [
                {
                    "name": d.name,
                    "expected": _sig(d.expected, FORECAST_DIGITS),
                    "observed": _sig(d.observed, FORECAST_DIGITS),
                    "z": _sig(d.z, SCORE_DIGITS),
                }
                for d in event.features
            ],
            "model": _model(model_name, model_version),
        }
    )


def active_alerts(device: str, ts: float, alerts: Iterable[AlertEvent]) -> bytes:
    return _dumps(
        {
            "device": device,
            "ts": _ts(ts),
            "alerts": [
                {"alert_id": a.alert_id, "severity": a.severity, "started_at": _ts(a.started_at), "score": _sig(a.score, SCORE_DIGITS)}
                for a in alerts
            ],
        }
    )


def status(
    state: str, agent_id: str, version: str, model_name: str, model_version: str, model_sha256: str, ts: float, reason: str | None = None
) -> bytes:
    body: dict[str, Any] = {
        "state": state,
        "agent_id": agent_id,
        "version": version,
        "model": {"name": model_name, "version": model_version, "sha256": model_sha256},
        "ts": _ts(round(ts)),
    }
    if reason is not None:  # only the last will says why
        body["reason"] = reason
    return _dumps(body)


def error(ts: float, topic: str | None, device: str | None, reason: str, detail: str, suppressed: int) -> bytes:
    return _dumps(
        {
            "ts": _ts(round(ts, 3)),
            "topic": None if topic is None else topic[:MAX_TOPIC_CHARS],
            "device": None if device is None else device[:MAX_TOPIC_CHARS],
            "reason": reason,
            "detail": detail[:MAX_DETAIL_CHARS],
            "suppressed": suppressed,
        }
    )
