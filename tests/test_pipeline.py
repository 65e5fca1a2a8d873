"""Pipeline: windows -> batched inference -> scoring/alerts, the one code path of the daemon and replay."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from bundles import PUMP_BUNDLE, healthy_series, multivariate_bundle, univariate_bundle

from agent.config.settings import Settings
from agent.core.events import AlertEvent, Forecast, Rejection, Sample
from agent.core.model import load_bundle
from agent.core.pipeline import Pipeline

T0 = 1_763_737_200.0  # a multiple of 60


@pytest.fixture(scope="module")
def uni():
    return load_bundle(univariate_bundle())  # lookback 16, horizon 4, period 60, persistence forecaster


def make_pipeline(bundle, **sections) -> Pipeline:
    return Pipeline(bundle, Settings(model={"path": bundle.path}, **sections))


def series_samples(values, device: str = "dev-a", start: int = 0) -> list[Sample]:
    return [Sample(device, T0 + 60 * (start + k), {"value": float(v)}, T0 + 60 * (start + k)) for k, v in enumerate(values)]


def run_one_by_one(pipeline: Pipeline, samples: list[Sample]) -> list:
    events = []
    for sample in samples:
        events += pipeline.process([sample], now=sample.ts)
    return events


class PredictSpy:
    """Wraps the real Bundle.run_scaled (the model call) and records the batch size of each call."""

    def __init__(self, bundle):
        self.bundle, self.real, self.batches = bundle, bundle.run_scaled, []
        bundle.run_scaled = self

    def __call__(self, x):
        self.batches.append(x.shape[0])
        return self.real(x)

    def remove(self):
        del self.bundle.run_scaled  # the class's method again


def test_due_devices_share_one_batched_predict(uni):
    """Several devices whose windows advance in one call are forecast by one model call with batch > 1."""
    pipeline = make_pipeline(uni)
    warmup = [s for k in range(15) for s in (series_samples([10.0], f"dev-{d}", k)[0] for d in range(5))]
    pipeline.process(warmup, now=T0)
    spy = PredictSpy(uni)
    try:
        events = pipeline.process([series_samples([10.0], f"dev-{d}", 15)[0] for d in range(5)], now=T0 + 900)
    finally:
        spy.remove()
    assert spy.batches == [5]
    assert sorted(e.device for e in events if isinstance(e, Forecast)) == [f"dev-{d}" for d in range(5)]
    assert pipeline.stats()["batches"] == 1


def test_batches_are_chunked_by_max_batch(uni):
    """inference.max_batch bounds the windows per onnxruntime call."""
    pipeline = make_pipeline(uni, inference={"max_batch": 2})
    samples = [s for k in range(16) for s in (series_samples([10.0], f"dev-{d}", k)[0] for d in range(5))]
    spy = PredictSpy(uni)
    try:
        pipeline.process(samples, now=T0)
    finally:
        spy.remove()
    assert spy.batches == [2, 2, 1]


def test_forecast_fields_and_horizon_timestamps(uni):
    """A forecast's ts is its last slot, horizon_ts = ts + k * period, staleness = now - ts, values per target."""
    pipeline = make_pipeline(uni)
    values = healthy_series(16)
    events = pipeline.process(series_samples(values), now=T0 + 15 * 60 + 7)
    [forecast] = [e for e in events if isinstance(e, Forecast)]
    assert forecast.ts == T0 + 15 * 60
    assert forecast.horizon_ts == [forecast.ts + 60 * k for k in range(1, 5)]
    assert forecast.staleness_s == pytest.approx(7.0)
    assert forecast.completeness == 1.0
    np.testing.assert_allclose(forecast.values["value"], [values[-1]] * 4, rtol=1e-6)  # persistence model


def test_no_forecast_before_the_window_is_full(uni):
    """Forecasts start with the lookback-th slot of a device."""
    pipeline = make_pipeline(uni)
    events = run_one_by_one(pipeline, series_samples(healthy_series(20)))
    forecasts = [e for e in events if isinstance(e, Forecast)]
    assert [f.ts for f in forecasts] == [T0 + 60 * k for k in range(15, 20)]


def test_stride_runs_the_model_every_nth_slot(uni):
    """inference.stride = 3 forecasts every third slot once the window is full."""
    pipeline = make_pipeline(uni, inference={"stride": 3})
    events = run_one_by_one(pipeline, series_samples(healthy_series(25)))
    assert [(f.ts - T0) / 60 for f in events if isinstance(f, Forecast)] == [15, 18, 21, 24]


def test_healthy_data_opens_no_alert(uni):
    """Healthy data (a slow sine plus the calibrated noise) is scored but never alerts."""
    pipeline = make_pipeline(uni)
    events = pipeline.process(series_samples(healthy_series(3000, seed=3)), now=T0)
    assert not [e for e in events if isinstance(e, AlertEvent)]
    assert pipeline.stats()["scored"] == 3000 - 16


def test_injected_deviation_opens_updates_and_ends_one_alert(uni):
    """A burst of large deviations opens an alert (new, update..., end) with one stable alert_id."""
    pipeline = make_pipeline(uni, detect={"update_every_samples": 3})
    values = healthy_series(400, seed=4)
    spikes = np.zeros(400)
    spikes[200:230:2] = 1.5  # alternating deviations of ~10 residual sigmas
    events = pipeline.process(series_samples(values + spikes), now=T0)
    alerts = [e for e in events if isinstance(e, AlertEvent)]
    assert alerts and alerts[0].state == "new" and alerts[-1].state == "end"
    assert {a.state for a in alerts[1:-1]} == {"update"}
    assert len({a.alert_id for a in alerts}) == 1
    assert T0 + 60 * 200 <= alerts[0].started_at <= T0 + 60 * 203
    assert alerts[-1].ended_at is not None and alerts[-1].ended_at > alerts[0].started_at
    assert alerts[0].features[0].name == "value"
    assert pipeline.active_alerts("dev-a") == []


def test_active_alerts_reports_the_open_alert(uni):
    """While open, active_alerts(device) returns the alert as of its last event."""
    pipeline = make_pipeline(uni, detect={"update_every_samples": 1000})
    values = healthy_series(100, seed=5)
    values[60:] += np.arange(40) * 0.5  # a ramp that keeps deviating
    events = pipeline.process(series_samples(values), now=T0)
    [new] = [e for e in events if isinstance(e, AlertEvent)]
    assert pipeline.active_alerts("dev-a") == [new]
    assert pipeline.active_alerts("other") == []


def test_results_do_not_depend_on_how_samples_are_split_into_calls(uni):
    """One call with everything, or one call per sample, gives the same forecasts and alerts in the same order."""
    values = healthy_series(300, seed=6)
    values[150:160] += 2.0
    samples = [s for k, v in enumerate(values) for s in (series_samples([v], "a", k) + series_samples([v + 1], "b", k))]
    together = make_pipeline(uni).process(samples, now=T0 + 1e5)
    apart = []
    pipeline = make_pipeline(uni)
    for s in samples:
        apart += pipeline.process([s], now=T0 + 1e5)
    assert together == apart
    assert any(isinstance(e, AlertEvent) for e in together)


def test_late_sample_is_reported_and_the_rest_of_the_call_processed(uni):
    """A sample older than window.max_lateness_periods becomes a late_sample Rejection; others still count."""
    pipeline = make_pipeline(uni, window={"max_lateness_periods": 5})
    samples = series_samples(healthy_series(16))
    samples.insert(10, series_samples([10.0], start=2)[0])
    events = pipeline.process(samples, now=T0)
    [rejection] = [e for e in events if isinstance(e, Rejection)]
    assert (rejection.reason, rejection.device) == ("late_sample", "dev-a")
    assert len([e for e in events if isinstance(e, Forecast)]) == 1


def test_low_completeness_windows_forecast_but_do_not_score(uni):
    """Below window.min_completeness a forecast is still published but its residual is not scored."""
    pipeline = make_pipeline(uni, window={"max_gap_periods": 10, "min_completeness": 0.8})
    sparse = [s for k, s in enumerate(series_samples(healthy_series(60))) if k % 3 == 0]  # 1/3 observed
    events = pipeline.process(sparse, now=T0)
    forecasts = [e for e in events if isinstance(e, Forecast)]
    assert forecasts and max(f.completeness for f in forecasts) < 0.8
    assert pipeline.stats()["scored"] == 0


@pytest.mark.parametrize("clean_periods", [1, 2])
def test_gap_costs_the_missing_slot_and_the_next_ones_their_scores(uni, clean_periods):
    """A filled-forward slot is not scored, nor are the slots whose forecast window ends within clean_periods of it."""
    pipeline = make_pipeline(uni, window={"clean_periods": clean_periods})
    samples = [s for k, s in enumerate(series_samples(healthy_series(40))) if k != 25]
    events = pipeline.process(samples, now=T0)
    # Slots 16..39 have a forecast from their previous slot when nothing is missing (24); 25 (missing) and 26 (no
    # forecast made at 25) lose theirs, and 27 too when the window ending at 26 is too fresh from the gap.
    assert pipeline.stats()["scored"] == 24 - 1 - clean_periods
    assert T0 + 25 * 60 not in [e.ts for e in events if isinstance(e, Forecast)]


def test_per_sensor_samples_merge_into_one_forecast():
    """Per-sensor samples of one slot are merged; the forecast comes when the slot is complete."""
    bundle = load_bundle(multivariate_bundle())  # 4 features, lookback 8
    pipeline = make_pipeline(bundle)
    base = {"bearing_temp": 55.0, "vibration_rms": 3.0, "motor_current": 20.0, "outlet_pressure": 4.0}
    samples = [Sample("p", T0 + 60 * k, base, T0) for k in range(7)]
    samples += [Sample("p", T0 + 60 * 7 + j, {name: value + 1}, T0) for j, (name, value) in enumerate(base.items())]
    events = pipeline.process(samples[:-1], now=T0)
    assert not [e for e in events if isinstance(e, Forecast)]
    [forecast] = [e for e in pipeline.process(samples[-1:], now=T0) if isinstance(e, Forecast)]
    assert forecast.values["bearing_temp"][0] == pytest.approx(56.0)
    assert set(forecast.values) == {"bearing_temp", "vibration_rms"}


def test_device_limit_rejects_new_devices(uni):
    """ingest.max_devices bounds the device table; further devices are rejected, known ones still work."""
    pipeline = make_pipeline(uni, ingest={"max_devices": 2})
    events = pipeline.process([series_samples([10.0], f"d{k}")[0] for k in range(3)], now=T0)
    [rejection] = events
    assert rejection.device == "d2" and "max_devices" in rejection.detail
    assert pipeline.stats()["devices"] == 2


def test_ten_thousand_devices_fit_in_well_under_100_mib():
    """Per-device state of 10,000 devices of the pump model (lookback 60, 4 features) stays far below 100 MiB."""
    bundle = load_bundle(PUMP_BUNDLE)
    pipeline = make_pipeline(bundle)
    values = {"bearing_temp": 55.0, "vibration_rms": 3.0, "motor_current": 20.0, "outlet_pressure": 4.0}
    tracemalloc.start()
    try:
        pipeline.process([Sample(f"pump-{k:05d}", T0, values, T0) for k in range(10_000)], now=T0)
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pipeline.stats()["devices"] == 10_000
    # Windows (16 MB at capacity 16384), the past-forecast ring of 10 steps (26 MB), the batch buffer (10 MB).
    assert current < 64 * 2**20, current
    assert pipeline.state_bytes() < 64 * 2**20


def test_shipped_model_stays_quiet_on_healthy_pumps_and_alerts_on_an_injected_jump():
    """pump-lstm on the synthetic fleet: no alert on a healthy pump; a sudden +15 degC bearing jump alerts."""
    synth = pytest.importorskip("simulation.synth")
    bundle = load_bundle(PUMP_BUNDLE)
    rows = synth.generate_fleet(synth.FleetConfig(devices=2, hours=16, seed=11, faults="none")).rows
    jump_ts = rows["ts"][0] + 10 * 3600
    jumped = (rows["device"] == "pump-01") & (rows["ts"] >= jump_ts)
    bearing = rows["bearing_temp"] + np.where(jumped, 15.0, 0.0)
    samples = [
        Sample(str(device), float(ts), {**{f: float(rows[f][k]) for f in bundle.features}, "bearing_temp": float(bearing[k])}, float(ts))
        for k, (ts, device) in enumerate(zip(rows["ts"], rows["device"]))
    ]
    pipeline = make_pipeline(bundle)
    events = pipeline.process(samples, now=float(rows["ts"][-1]))
    alerts = [e for e in events if isinstance(e, AlertEvent)]
    assert not [a for a in alerts if a.device == "pump-00"]
    opened = [a for a in alerts if a.device == "pump-01" and a.state == "new"]
    # (the pump stays 15 degC off its normal afterwards, so later alerts on it are not false alarms)
    assert opened and jump_ts <= opened[0].started_at <= jump_ts + 180
    assert opened[0].features[0].name == "bearing_temp"
    assert opened[0].features[0].observed - opened[0].features[0].expected > 5.0


def bundle_with_calibration(source, tmp_path, **calibration):
    """A copy of a bundle folder whose manifest calibration has extra keys (model.onnx and its sha256 unchanged)."""
    import json
    import shutil

    folder = tmp_path / "variant"
    shutil.copytree(source, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["calibration"].update(calibration)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return load_bundle(folder)


def first_alert_slot(bundle, values) -> int | None:
    events = make_pipeline(bundle, detect={"update_every_samples": 1000}).process(series_samples(values), now=T0)
    opened = [e for e in events if isinstance(e, AlertEvent) and e.state == "new"]
    return int((opened[0].started_at - T0) // 60) if opened else None


def test_multi_step_scoring_detects_a_slow_drift_that_one_step_misses(tmp_path):
    """A drift of 1 residual sigma per period hides in one-step residuals; the 4-step residual sees it."""
    one_step = load_bundle(univariate_bundle())
    multi_step = bundle_with_calibration(univariate_bundle(), tmp_path, score_steps=[1, 2, 3, 4])
    values = healthy_series(400, seed=6)
    values[200:] += np.arange(200) * 0.15  # persistence forecaster: one-step residual 0.15 = 1 sigma, 4-step 4 sigma
    assert first_alert_slot(one_step, values) is None
    started = first_alert_slot(multi_step, values)
    assert started is not None and 200 <= started <= 215
    assert first_alert_slot(multi_step, healthy_series(400, seed=6)) is None


def test_bundle_without_new_calibration_keys_scores_one_step_without_flat_line(uni):
    """Older bundles (no score_steps, no flatline_repeats) keep the first version's one-step score."""
    pipeline = make_pipeline(uni)
    assert pipeline.detector.scorer.steps == [1] and not pipeline.detector.flatline_on


def test_bad_score_steps_are_a_bundle_error(tmp_path):
    """score_steps beyond the horizon make the bundle unusable, with a message naming the key."""
    from agent.core.model import BundleError

    bundle = bundle_with_calibration(univariate_bundle(), tmp_path, score_steps=[1, 9])
    with pytest.raises(BundleError, match="calibration"):
        make_pipeline(bundle)


def test_reordered_sample_within_tolerance_is_accepted_not_rejected(uni):
    """A sample arriving after a newer one, within window.max_lateness_periods, is put in place and counted."""
    pipeline = make_pipeline(uni, window={"max_lateness_periods": 3})
    samples = series_samples(healthy_series(30))
    samples[20], samples[21] = samples[21], samples[20]
    events = pipeline.process(samples, now=T0)
    assert not [e for e in events if isinstance(e, Rejection)]
    assert pipeline.stats()["reordered"] == 1 and pipeline.stats()["late_samples"] == 0


def test_no_alerts_from_mostly_imputed_windows_even_with_large_deviations(uni):
    """Deviations in a window below min_completeness never open an alert (forecasts are still published)."""
    pipeline = make_pipeline(uni, window={"max_gap_periods": 10, "min_completeness": 0.8})
    values = healthy_series(200) + np.where(np.arange(200) > 100, 5.0, 0.0)
    sparse = [s for k, s in enumerate(series_samples(values)) if k % 2 == 0]  # half observed
    events = pipeline.process(sparse, now=T0)
    assert [e for e in events if isinstance(e, Forecast)]
    assert not [e for e in events if isinstance(e, AlertEvent)]


def _detector_state(pipeline: Pipeline) -> dict:
    detector = pipeline.detector
    keys = ("ewma", "score", "scored", "over", "under", "cooldown", "first_over_ts", "first_under_ts", "last_value",
            "repeats", "opens", "peak_z", "peak_expected", "peak_observed")
    return {key: getattr(detector, key)[: len(pipeline.windows)].copy() for key in keys}


@pytest.mark.parametrize("chunk", [97, 1024])
def test_quiet_devices_scored_together_give_exactly_the_one_by_one_results(chunk):
    """Scoring the samples of quiet devices all at once gives the same events and detector state, bit for bit, as scoring each sample on its own."""
    synth = pytest.importorskip("simulation.synth")
    bundle = load_bundle(PUMP_BUNDLE)
    fleet = synth.generate_fleet(synth.FleetConfig(devices=6, hours=30, seed=1, faults="auto"))
    rows = fleet.rows
    assert {f["kind"] for f in fleet.schedule} >= {"stuck_sensor", "spikes"}  # flat lines and alerts are exercised
    samples = [Sample(str(device), float(ts), {f: float(rows[f][k]) for f in bundle.features}, float(ts))
               for k, (ts, device) in enumerate(zip(rows["ts"], rows["device"]))]
    results = {}
    for vectorized in (False, True):
        pipeline = make_pipeline(bundle)
        pipeline.detector.vectorize_quiet = vectorized
        calls = []
        real_observe = pipeline.detector.observe
        pipeline.detector.observe = lambda *args, **kwargs: calls.append(1) or real_observe(*args, **kwargs)
        events = []
        for start in range(0, len(samples), chunk):  # several samples of one device per call
            events += pipeline.process(samples[start : start + chunk], now=samples[start].ts)
        results[vectorized] = (events, _detector_state(pipeline), len(calls), pipeline.counters["scored"])
    (events_one, state_one, calls_one, scored_one), (events_all, state_all, calls_all, scored_all) = results[False], results[True]
    assert [e for e in events_one if isinstance(e, AlertEvent)], "the fleet's faults open alerts"
    assert events_all == events_one
    for key, value in state_one.items():
        np.testing.assert_array_equal(state_all[key], value, err_msg=key)
    assert scored_all == scored_one == calls_one
    assert calls_all < 0.2 * calls_one  # most samples took the vectorized path


def test_small_calls_take_the_one_by_one_paths_and_give_the_large_calls_results():
    """A steady trickle's calls of 1-3 samples (looked up, remembered and scored one by one) give the events, the
    detector state and the ring of past forecasts of 1,024-sample calls, bit for bit, on the shipped multi-step model."""
    synth = pytest.importorskip("simulation.synth")
    bundle = load_bundle(PUMP_BUNDLE)
    fleet = synth.generate_fleet(synth.FleetConfig(devices=3, hours=20, seed=4, faults="auto"))
    rows = fleet.rows
    samples = [Sample(str(device), float(ts), {f: float(rows[f][k]) for f in bundle.features}, float(ts))
               for k, (ts, device) in enumerate(zip(rows["ts"], rows["device"]))]
    results = []
    for sizes in ((1024,), (1, 2, 3)):
        pipeline = make_pipeline(bundle)
        events, start, k = [], 0, 0
        while start < len(samples):
            size = sizes[k % len(sizes)]
            events += pipeline.process(samples[start : start + size], now=samples[-1].ts)
            start, k = start + size, k + 1
        n = len(pipeline.windows)
        results.append((events, _detector_state(pipeline), pipeline.past[:n].copy(), pipeline.past_slot[:n].copy(), pipeline.past_ok[:n].copy()))
    (events_big, state_big, *ring_big), (events_small, state_small, *ring_small) = results
    assert [e for e in events_big if isinstance(e, AlertEvent)], "the fleet's faults open alerts"
    assert events_small == events_big
    for key, value in state_big.items():
        np.testing.assert_array_equal(state_small[key], value, err_msg=key)
    for small, big in zip(ring_small, ring_big):
        np.testing.assert_array_equal(small, big)


def test_quiet_devices_scored_together_on_a_univariate_model(uni):
    """The one-target scorer scored many devices at once matches the one-by-one path, alerts included."""
    values = healthy_series(600, seed=3)
    values[300:340] += 4.0
    samples = sorted((s for d in range(5) for s in series_samples(values + 0.01 * d, device=f"dev-{d}")), key=lambda s: s.ts)
    results = {}
    for vectorized in (False, True):
        pipeline = make_pipeline(uni)
        pipeline.detector.vectorize_quiet = vectorized
        events = []
        for start in range(0, len(samples), 64):
            events += pipeline.process(samples[start : start + 64], now=samples[start].ts)
        results[vectorized] = (events, _detector_state(pipeline))
    assert [e for e in results[False][0] if isinstance(e, AlertEvent)]
    assert results[True][0] == results[False][0]
    for key, value in results[False][1].items():
        np.testing.assert_array_equal(results[True][1][key], value, err_msg=key)


@pytest.mark.parametrize("stride", [1, 3, 8])
def test_strided_forecasts_keep_few_past_forecasts_and_score_the_same(tmp_path, stride):
    """Past forecasts packed by step (and few at a stride) give the scores and alerts of a ring that keeps every value of one forecast per slot."""
    bundle = bundle_with_calibration(univariate_bundle(), tmp_path, score_steps=[1, 2, 3, 4])
    values = healthy_series(400, seed=4)
    values[200:260] += np.linspace(0.0, 8.0, 60)  # a drift that multi-step scores see
    samples = series_samples(values, "dev-a") + series_samples(values[:150], "dev-b", start=20)
    del samples[300:305]  # a gap: imputed slots shift which slots the stride picks
    samples.sort(key=lambda s: s.ts)
    runs = []
    for positions in (None, 64):
        pipeline = make_pipeline(bundle, inference={"stride": stride})
        if positions is not None:  # the reference: a position for every slot of the ring and more, every step in each
            pipeline._set_ring(positions, packed=False)
        events = []
        for start in range(0, len(samples), 37):
            events += pipeline.process(samples[start : start + 37], now=samples[start].ts)
        runs.append((events, pipeline.detector.ewma[:2].copy(), pipeline.counters["scored"], pipeline.past_slot.shape[1], pipeline.past.shape[1]))
    (events, ewma, scored, tags, cells), (ref_events, ref_ewma, ref_scored, _, ref_cells) = runs
    assert tags == (4 if stride == 1 else -(-4 // stride) + 1)
    assert cells == {1: 1 + 2 + 3 + 4, 3: 1 + 2 + 2 + 2, 8: 1 + 2 + 2 + 2}[stride] and ref_cells == 4 * 64
    assert scored == ref_scored > 0
    assert events == ref_events and [e for e in events if isinstance(e, AlertEvent)]
    np.testing.assert_array_equal(ewma, ref_ewma)
