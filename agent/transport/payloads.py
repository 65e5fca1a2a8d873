"""JSON encoding of everything the agent publishes (docs/contracts.md, "Topics and payloads").

Compact separators and rounded floats keep payloads small; non-finite numbers become null, never NaN.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from agent.core.events import AlertEvent, Forecast, ForecastValues

FORECAST_DIGITS = 5  # significant digits of forecast values: far below any sensor's noise
SCORE_DIGITS = 4
MAX_DETAIL_CHARS = 300
MAX_TOPIC_CHARS = 200


def agent_version() -> str:
    """edgecast's version: agent.__version__, which pyproject.toml reads (importlib.metadata would load ~60 modules
    into the daemon for it)."""
    from agent import __version__

    return __version__


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


def forecast(fc: Forecast, model_name: str, model_version: str, intervals=None) -> bytes:
    """The same bytes as `_forecast_reference`, written as text directly: this runs once per forecast, thousands
    of times a second, and json.dumps of a nested dict with per-value rounding was the daemon's largest
    encoding cost. Anything unusual (non-finite values) takes the reference path."""
    try:
        values = _pipeline_values_text(fc.values)
        if values is None:
            values = ",".join([f"{_json_str(target)}:[{_json_sig5_list(series)}]" for target, series in fc.values.items()])
        band = "" if intervals is None else f',"interval":{_interval_text(fc, intervals)}'
        return (
            f'{{"device":{_json_str(fc.device)},"model":{_json_model(model_name, model_version)},"ts":{_json_ts(fc.ts)},'
            f'"period_s":{_json_ts(fc.period_s)},"horizon_ts":[{_json_ts_list(fc.horizon_ts)}],'
            f'"forecast":{{{values}}}{band},"completeness":{_json_round(fc.completeness, 4)},"staleness_s":{_json_round(fc.staleness_s, 3)}}}'
        ).encode("utf-8")
    except _Unusual:
        return _forecast_reference(fc, model_name, model_version, intervals)


def _interval_bounds(fc: Forecast, intervals) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(level names, lower (K, T, H), upper (K, T, H)) of a forecast's prediction bands."""
    yhat = np.array([fc.values[t] for t in fc.values], dtype=np.float64).T  # (H, T)
    lower, upper = intervals.bounds(yhat, getattr(fc, "interval_scale", None),  # (K, H, T) each; normalized: the window's scale
                                    getattr(fc, "interval_multiplier", None))  # adaptive: the device's multiplier
    return intervals.level_names(), lower.transpose(0, 2, 1).astype(np.float64), upper.transpose(0, 2, 1).astype(np.float64)


def _interval_text(fc: Forecast, intervals) -> str:
    """{"80": {"lower": {target: [H]}, "upper": {...}}, "95": ...}: each level's band, rounded as the forecast is."""
    names, lower, upper = _interval_bounds(fc, intervals)
    targets = list(fc.values)
    parts = []
    for k, name in enumerate(names):
        sides = []
        for side, bound in (("lower", lower[k]), ("upper", upper[k])):
            sides.append(f'"{side}":{{' + ",".join(f"{_json_str(t)}:[{_json_sig5_list(bound[j].tolist())}]" for j, t in enumerate(targets)) + "}")
        parts.append(f'{_json_str(name)}:{{{",".join(sides)}}}')
    return "{" + ",".join(parts) + "}"


def _pipeline_values_text(values) -> str | None:
    """The "forecast" members of the pipeline's ForecastValues in one C-level format of every number; None when
    the values are not the pipeline's or a number needs more than '%.5g' (non-finite, exponent, whole)."""
    if type(values) is not ForecastValues:
        return None
    rows = values.batch[values.row].tolist()  # (T, H) floats
    if not rows or not rows[0]:
        return None
    H = len(rows[0])
    text = _series_format(len(rows), H).format(*itertools.chain.from_iterable(rows))
    if "e" in text or "n" in text or text.count(".") != len(rows) * H:
        return None
    return ",".join([f"{_json_str(target)}:[{series}]" for target, series in zip(values.targets, text.split("|"))])


@functools.lru_cache(maxsize=16)
def _series_format(targets: int, steps: int) -> str:
    return "|".join([",".join(["{:.5g}"] * steps)] * targets)


def forecasts(fcs: list[Forecast], model_name: str, model_version: str, intervals=None) -> list[bytes]:
    """`forecast` of many forecasts, the same bytes: the numbers of a whole batch are written as text by numpy
    (`_sig5_texts`) instead of one float format per value, which was the encoder's largest cost (40 values per
    forecast). Forecasts with a value outside the fast path, or not shaped like the first one, take `forecast`."""
    if len(fcs) < _BATCH_ENCODE_MIN or intervals is not None:  # the vectorized writer's fixed cost (~100 us) is more
        return [forecast(fc, model_name, model_version, intervals) for fc in fcs]  # than a few forecasts' own
    targets = list(fcs[0].values)
    T = len(targets)
    first = fcs[0].values
    if isinstance(first, ForecastValues) and all(
        type(fc.values) is ForecastValues and fc.values.batch is first.batch and fc.values.targets is first.targets for fc in fcs
    ):  # the pipeline's: rows of one array
        shaped = [True] * len(fcs)
        values = first.batch[[fc.values.row for fc in fcs]]  # (N, T, H) float64
    else:
        shaped = [list(fc.values) == targets for fc in fcs]
        try:
            values = np.array([list(fc.values.values()) for fc, ok in zip(fcs, shaped) if ok], dtype=np.float64)  # (N, T, H)
        except (ValueError, TypeError):  # ragged: series of different lengths
            return [forecast(fc, model_name, model_version) for fc in fcs]
    if values.ndim != 3 or values.shape[2] == 0:
        return [forecast(fc, model_name, model_version) for fc in fcs]
    # In pieces: the temporaries of a whole 1,000-forecast call (~40 of 320 KiB) are above glibc's mmap threshold
    # and were mapped and faulted in anew on every call; at 128 forecasts they stay in the heap (5.7 -> 2.1 us each).
    pieces = [_sig5_texts(values[start : start + _SIG5_ROWS]) for start in range(0, len(values), _SIG5_ROWS)]
    texts = [text for piece_texts, piece_fast in pieces for text in piece_texts[: len(piece_fast) * T]]  # (split's last "")
    fast = np.concatenate([piece_fast for _, piece_fast in pieces])
    head = f'{{"device":%s,"model":{_json_model(model_name, model_version).replace("%", "%%")},"ts":%s,"period_s":%s,"horizon_ts":[%s],"forecast":{{'
    series = ",".join(f"{_json_str(t).replace('%', '%%')}:[%s]" for t in targets)
    template = head + series + '},"completeness":%s,"staleness_s":%s}'
    times: dict[float, str] = {}  # timestamps, completeness and staleness repeat within a batch: each written once
    shares: dict[float, str] = {}
    ages: dict[float, str] = {}
    horizons: dict[tuple, str] = {}
    out: list[bytes] = []
    row = 0
    for fc, ok in zip(fcs, shaped):
        if not ok:
            out.append(forecast(fc, model_name, model_version))
            continue
        k, row = row, row + 1
        if not fast[k]:
            out.append(forecast(fc, model_name, model_version))
            continue
        try:
            ts = times.get(fc.ts)
            if ts is None:
                ts = times[fc.ts] = _json_ts(fc.ts)
            period = times.get(fc.period_s)
            if period is None:
                period = times[fc.period_s] = _json_ts(fc.period_s)
            key = tuple(fc.horizon_ts)
            horizon = horizons.get(key)
            if horizon is None:
                horizon = horizons[key] = _json_ts_list(fc.horizon_ts)
            text = template % (_json_str(fc.device), ts, period, horizon, *texts[k * T : k * T + T],
                               _round_text(shares, fc.completeness, 4), _round_text(ages, fc.staleness_s, 3))
        except _Unusual:
            out.append(_forecast_reference(fc, model_name, model_version))
            continue
        out.append(text.encode("utf-8"))
    return out


def _round_text(cache: dict[float, str], value: float, digits: int) -> str:
    """_json_round through a per-batch cache; zero is not cached (0.0 and -0.0 are one key but two texts)."""
    text = cache.get(value)
    if text is None:
        text = _json_round(value, digits)
        if value:
            cache[value] = text
    return text


@functools.cache
def _sig5_tables() -> tuple[np.ndarray, np.ndarray]:
    """For every 5-digit integer (10000..99999): its ASCII digits packed in a little-endian uint64 (byte j is the
    j-th digit), and its trailing zeros."""
    r = np.arange(10000, 100000)
    digits = np.zeros((r.size, 8), dtype=np.uint8)
    for j in range(5):
        digits[:, j] = ord("0") + (r // 10 ** (4 - j)) % 10
    zeros = np.zeros(r.shape, dtype=np.int64)
    for j in range(1, 5):
        zeros += r % 10**j == 0
    return digits.view("<u8").ravel(), zeros


def _sig5_texts(values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(N, T, H) values -> (the comma-joined JSON of _sig(v, 5) of each series, N*T strings; per forecast whether
    every value took the fast path (N,) bool). Strings of forecasts not on the fast path are meaningless.

    Fast path: finite, 1e-4 <= |v| < 1e5 after rounding to 5 significant digits, and not within 1e-7 of a rounding
    tie (there the exact binary value decides: '%.5g' is asked). The rounded value is the double nearest to the
    decimal d * 10**-k (d of 5 digits, k decimals), and its shortest repr is that decimal without trailing zeros.
    Each text is assembled from the packed digits with integer shifts (bytes in little-endian uint64 lanes), then
    the NUL padding is deleted from the whole batch at once."""
    N, T, H = values.shape
    digits, trailing = _sig5_tables()
    a = np.abs(values).ravel()
    with np.errstate(all="ignore"):
        k = np.clip(4 - np.floor(np.log10(a)), 0, 8)
        k = np.where(np.isfinite(k), k, 0).astype(np.intp)
        scaled = a * _POW10[k]
        # log10 may be off by one next to a power of ten
        k = np.where(scaled < 9999.5, np.minimum(k + 1, 8), np.where(scaled >= 99999.5, np.maximum(k - 1, 0), k))
        scaled = a * _POW10[k]
        d = np.rint(scaled)
        ok = (d >= 1e4) & (d < 1e5) & (np.abs(scaled - np.floor(scaled) - 0.5) > 1e-7) & np.isfinite(a)
    d = np.where(ok, d, 1e4).astype(np.intp) - 10000
    packed = digits[d]  # (M,) bytes 0..4: the digits
    places = k.astype(np.uint64)
    length = np.maximum(k - trailing[d], 1)  # decimals kept (at least one: repr writes 12346.0)
    # 1 <= |v| (k <= 4): 5 - k integer digits, '.', the other digits (k = 0: '.0'); fits in one lane.
    split = 8 * (5 - np.minimum(places, 5))  # bits of the integer digits
    whole = packed & ((np.uint64(1) << split) - np.uint64(1))
    fraction = (packed >> split) << (split + np.uint64(8))
    point = np.uint64(ord(".")) << split
    zero = np.where(places == 0, np.uint64(ord("0")) << (split + np.uint64(8)), np.uint64(0))
    large = whole | point | fraction | zero
    # |v| < 1 (k >= 5): '0.', k - 5 zeros, the 5 digits from byte k - 3 on; up to 10 bytes, over two lanes.
    shift = 8 * (np.maximum(places, 5) - np.uint64(3))  # 16..40 bits
    zeros = (np.uint64(0x3030303030303030) << np.uint64(16)) & ((np.uint64(1) << shift) - np.uint64(1))
    small_low = np.uint64(ord("0")) | (np.uint64(ord(".")) << np.uint64(8)) | zeros | (packed << shift)
    small_high = packed >> (np.uint64(64) - shift)
    is_large = k <= 4
    chars = np.zeros((a.size, 4), dtype="<u8")  # lanes: sign, text (2), separator
    length += np.where(is_large, 5 - k, 1) + 1  # characters of the text
    bits = 8 * np.minimum(length, 8).astype(np.uint64)
    low_mask = np.where(bits == 64, np.uint64(0xFFFFFFFFFFFFFFFF), (np.uint64(1) << (bits % np.uint64(64))) - np.uint64(1))
    high_mask = (np.uint64(1) << (8 * np.maximum(length - 8, 0)).astype(np.uint64)) - np.uint64(1)
    chars[:, 1] = np.where(is_large, large, small_low) & low_mask  # cuts the trailing zeros
    chars[:, 2] = np.where(is_large, np.uint64(0), small_high & high_mask)
    chars[:, 0] = np.where(values.ravel() < 0, np.uint64(ord("-")), np.uint64(0))
    chars[:, 3] = ord(",")
    chars.reshape(N * T, H, 4)[:, -1, 3] = ord("\n")
    texts = chars.tobytes().translate(None, b"\0").decode("ascii").split("\n")
    return texts, ok.reshape(N, T * H).all(axis=1)


_POW10 = 10.0 ** np.arange(0, 9)  # exact doubles
_SIG5_ROWS = 128  # forecasts per _sig5_texts call (see `forecasts`)
_BATCH_ENCODE_MIN = 8  # fewer forecasts are written one by one (measured crossover: 8)


class _Unusual(Exception):
    """A value the fast forecast encoder leaves to json.dumps."""


@functools.lru_cache(maxsize=4096)
def _json_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


@functools.lru_cache(maxsize=16)
def _json_model(name: str, version: str) -> str:
    return _dumps(_model(name, version)).decode("utf-8")


def _json_sig5(value: float) -> str:
    """JSON of _sig(value, FORECAST_DIGITS): '%.5g' is already the shortest repr when it is positional with a '.'
    (1e-4 <= |value| < 1e5, not whole); the other cases go through float() and repr like json.dumps."""
    text = f"{value:.5g}"
    if "." in text and "e" not in text and "n" not in text:
        return text
    rounded = _sig(value, FORECAST_DIGITS)
    return "null" if rounded is None else repr(rounded)


_FORMAT_SIG5 = "{:.5g}".format


def _json_sig5_list(values: list[float]) -> str:
    """_json_sig5 of each value, comma-joined; one C-level pass when every value is positional (the usual case)."""
    text = ",".join(map(_FORMAT_SIG5, values))
    if "e" in text or "n" in text or text.count(".") != len(values):
        return ",".join([_json_sig5(v) for v in values])
    return text


def _json_ts_list(values: list[float]) -> str:
    """_json_ts of each value, comma-joined; whole seconds (the sampling grid) in one pass."""
    try:
        whole = [int(v) for v in values]
    except (OverflowError, ValueError):
        raise _Unusual from None
    if whole == values:
        return ",".join(map(str, whole))
    return ",".join([_json_ts(v) for v in values])


def _json_ts(value: float) -> str:
    value = float(value)
    if value.is_integer():
        return str(int(value))
    rounded = round(value, 3)
    if not math.isfinite(rounded):
        raise _Unusual
    return repr(rounded)


def _json_round(value: float, digits: int) -> str:
    rounded = round(float(value), digits)
    if not math.isfinite(rounded):
        raise _Unusual
    return repr(rounded)


def _forecast_reference(fc: Forecast, model_name: str, model_version: str, intervals=None) -> bytes:
    """The forecast payload as the contract's plain JSON encoding: the definition `forecast` must equal."""
    body = {
        "device": fc.device,
        "model": _model(model_name, model_version),
        "ts": _ts(fc.ts),
        "period_s": _ts(fc.period_s),
        "horizon_ts": [_ts(t) for t in fc.horizon_ts],
        "forecast": {target: [_sig(v, FORECAST_DIGITS) for v in values] for target, values in fc.values.items()},
    }
    if intervals is not None:
        names, lower, upper = _interval_bounds(fc, intervals)
        body["interval"] = {
            name: {side: {t: [_sig(v, FORECAST_DIGITS) for v in bound[k, j].tolist()] for j, t in enumerate(fc.values)}
                   for side, bound in (("lower", lower), ("upper", upper))}
            for k, name in enumerate(names)
        }
    body["completeness"] = round(float(fc.completeness), 4)
    body["staleness_s"] = round(float(fc.staleness_s), 3)
    return _dumps(body)


def alert(event: AlertEvent, model_name: str, model_version: str, operator: dict | None = None) -> bytes:
    """`operator`: the alert's operator state (acknowledged, shelved_until: agent/core/alarms.py), added when there is one."""
    body = (
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
    if operator:
        body.update(operator)
    return _dumps(body)


def active_alerts(device: str, ts: float, alerts: Iterable[AlertEvent], operator=None) -> bytes:
    """The retained list; `operator` (agent/core/alarms.py AlarmBook) adds each alert's and the device's operator state."""
    body = {
        "device": device,
        "ts": _ts(ts),
        "alerts": [
            {"alert_id": a.alert_id, "severity": a.severity, "started_at": _ts(a.started_at), "score": _sig(a.score, SCORE_DIGITS),
             **(operator.annotation(a.alert_id, device) if operator is not None else {})}
            for a in alerts
        ],
    }
    if operator is not None:
        body.update(operator.device_annotation(device))
    return _dumps(body)


def status(
    state: str, agent_id: str, version: str, model_name: str, model_version: str, model_sha256: str, ts: float, reason: str | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """The retained status; `extra` adds fields such as "outbox" counts and the last "model_reload" outcome."""
    body: dict[str, Any] = {
        "state": state,
        "agent_id": agent_id,
        "version": version,
        "model": {"name": model_name, "version": model_version, "sha256": model_sha256},
        "ts": _ts(round(ts)),
    }
    if reason is not None:  # only the last will says why
        body["reason"] = reason
    if extra:
        body.update({k: v for k, v in extra.items() if k not in body})
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
