"""Alert state machine (docs/contracts.md): enter/exit counts, severity, cooldown, updates, ids, attribution.

With ewma_alpha = 1 the score of a sample is max_j |z_j|, so each test scripts the score sequence exactly.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from agent.core.detect import AlertDetector, ResidualScorer, anomaly_score

THRESHOLDS = {"warning": 3.0, "critical": 6.0, "exit": 2.0}
TARGETS = ["temp", "current"]
SCALE = np.array([2.0, 10.0])  # original units per scaled unit


def make_detector(alpha: float = 1.0, **options) -> AlertDetector:
    scorer = ResidualScorer(np.zeros((3, 2)), np.ones((3, 2)), SCALE, alpha)
    defaults = dict(min_samples_over=3, min_samples_under=2, cooldown_samples=4, update_every_samples=5)
    return AlertDetector(scorer, THRESHOLDS, TARGETS, **{**defaults, **options})


def feed(detector: AlertDetector, scores: list[float], device: str = "pump-01", start: int = 0):
    """Feed samples whose temp z equals each score (current z = 0); returns [(index, event)] of emitted events."""
    events = []
    expected = np.array([50.0, 20.0])
    for k, score in enumerate(scores, start):
        observed = expected + np.array([score * SCALE[0], 0.0])  # z_temp = score
        _, event = detector.observe(0, device, 1000.0 + 60 * k, observed, expected)
        if event is not None:
            events.append((k, event))
    return events


def test_opens_after_min_samples_over_consecutive_scores():
    """An alert opens on the min_samples_over-th consecutive score >= warning; a dip resets the count."""
    detector = make_detector()
    events = feed(detector, [4, 4, 1, 4, 4, 4])
    assert [(k, e.state) for k, e in events] == [(5, "new")]
    assert events[0][1].started_at == 1000.0 + 60 * 3  # the first sample of the run over the threshold
    assert events[0][1].severity == "warning"


def test_no_alert_below_warning():
    """Scores under the warning threshold never open an alert, however long."""
    assert feed(make_detector(), [2.9] * 200) == []


def test_stays_open_between_exit_and_warning_then_ends_after_min_samples_under():
    """Hysteresis: scores between exit and warning keep it open; min_samples_under scores < exit end it."""
    detector = make_detector(update_every_samples=1000)
    events = feed(detector, [4, 4, 4, 2.5, 2.5, 1, 2.5, 1, 1, 1])
    assert [(k, e.state) for k, e in events] == [(2, "new"), (8, "end")]
    end = events[1][1]
    assert end.ended_at == 1000.0 + 60 * 7  # the first of the closing run under exit
    assert detector.active(0) is None


def test_critical_severity_and_immediate_escalation_update():
    """Severity is critical while score >= critical; escalating from warning emits an update at once."""
    detector = make_detector(update_every_samples=1000)
    events = feed(detector, [4, 4, 4, 7, 7])
    assert [(k, e.state, e.severity) for k, e in events] == [(2, "new", "warning"), (3, "update", "critical")]
    assert feed(make_detector(), [7, 7, 7])[0][1].severity == "critical"


def test_periodic_updates_at_most_every_update_every_samples():
    """While open and unchanged, an update comes every update_every_samples scored samples, not more often."""
    detector = make_detector(update_every_samples=5)
    events = feed(detector, [4] * 18)
    assert [(k, e.state) for k, e in events] == [(2, "new"), (7, "update"), (12, "update"), (17, "update")]


def test_cooldown_blocks_new_alerts_after_an_end():
    """No new alert opens within cooldown_samples scored samples after an end."""
    detector = make_detector(cooldown_samples=4, update_every_samples=1000)
    events = feed(detector, [4, 4, 4, 1, 1] + [4] * 8)
    # end at 4; samples 5..8 are the cooldown; counting restarts at 9 -> new at 11
    assert [(k, e.state) for k, e in events] == [(2, "new"), (4, "end"), (11, "new")]


def test_alert_id_is_stable_for_the_alert_life_and_well_formed():
    """new, update and end carry one alert_id `{device}-{started_at}-{6 hex}`; the next alert has another."""
    detector = make_detector(cooldown_samples=0)
    events = feed(detector, [4, 4, 4, 4, 4, 4, 4, 4, 1, 1, 4, 4, 4])
    first = [e for _, e in events if e.started_at == 1000.0]
    assert [e.state for e in first] == ["new", "update", "end"]
    assert len({e.alert_id for e in first}) == 1
    assert re.fullmatch(r"pump-01-1000-[0-9a-f]{6}", first[0].alert_id)
    second = events[-1][1]
    assert second.state == "new" and second.alert_id != first[0].alert_id


def test_alert_ids_are_deterministic_per_device_and_start():
    """The same data replayed gives the same alert ids; another device gets a different id."""
    a = feed(make_detector(), [4, 4, 4])[0][1].alert_id
    b = feed(make_detector(), [4, 4, 4])[0][1].alert_id
    c = feed(make_detector(), [4, 4, 4], device="pump-02")[0][1].alert_id
    assert a == b != c


def test_attribution_names_deviating_targets_in_original_units():
    """Features lists targets whose smoothed |z| is notable, with expected and observed in original units."""
    detector = make_detector(alpha=0.5, min_samples_over=1)
    expected = np.array([50.0, 20.0])
    observed = np.array([50.0 + 5 * SCALE[0], 20.5])  # temp z = 5, current z = 0.05
    _, event = detector.observe(0, "pump-01", 0.0, observed, expected)  # EWMA: temp 13.0, current ~0.5
    assert event is not None and event.state == "new"
    [feature] = event.features
    assert (feature.name, feature.expected, feature.observed) == ("temp", 50.0, 60.0)
    assert feature.z == pytest.approx(5.0)


def test_threshold_scale_multiplies_thresholds():
    """detect.threshold_scale = 2 doubles warning, critical and exit (a score of 4 no longer alerts)."""
    detector = make_detector(threshold_scale=2.0)
    assert (detector.warning, detector.critical, detector.exit) == (6.0, 12.0, 4.0)
    assert feed(detector, [4] * 10) == []
    assert feed(detector, [6.5] * 3)[0][1].threshold == 6.0


def test_disabled_detector_scores_but_never_alerts():
    """detect.enabled = false keeps scoring (replay shows it) but emits no alert events."""
    detector = make_detector(enabled=False)
    assert feed(detector, [9] * 10) == []
    assert detector.score[0] == pytest.approx(9.0)


def test_anomaly_score_is_half_at_warning():
    """anomaly_score maps the unbounded score to [0, 1) with 0.5 exactly at the warning threshold."""
    detector = make_detector()
    feed(detector, [3.0])
    assert detector.anomaly_score(0) == 0.5
    assert anomaly_score(0.0, 3.0) == 0.0
    assert 0.99 < anomaly_score(1000.0, 3.0) < 1.0


def test_observe_matches_the_offline_score_series():
    """The detector's running score equals ResidualScorer.score_series over the same samples (calibration twin)."""
    detector = make_detector(alpha=0.2)
    rng = np.random.default_rng(0)
    observed = rng.normal(size=(50, 2)) * SCALE + [50, 20]
    expected = np.tile([50.0, 20.0], (50, 1))
    online = [detector.observe(0, "d", 60.0 * k, observed[k], expected[k])[0] for k in range(50)]
    np.testing.assert_allclose(online, detector.scorer.score_series(observed, expected))


def test_attribution_reports_the_largest_deviation_since_the_run_began():
    """A jump the forecaster then catches up with is reported at its peak, not at the (calm) opening sample."""
    detector = make_detector(alpha=0.2, min_samples_over=3)
    expected = np.array([50.0, 20.0])
    jump = np.array([50.0 + 40 * SCALE[0], 20.0])  # temp z = 40
    calm = expected + np.array([0.1 * SCALE[0], 0.0])
    events = []
    for k, observed in enumerate([jump, calm, calm]):
        events.append(detector.observe(0, "pump-01", 60.0 * k, observed, expected)[1])
    assert events[:2] == [None, None] and events[2].state == "new"
    [feature] = events[2].features
    assert (feature.name, feature.observed, feature.z) == ("temp", 130.0, pytest.approx(40.0))


# -- multi-step channels, flat line, flap suppression, dynamic thresholds -------------------------------------------


def test_missing_channels_keep_their_smoothed_value():
    """A NaN residual (no forecast for that step) leaves its channel's EWMA unchanged; the others update."""
    scorer = ResidualScorer(np.zeros((2, 2)), np.ones((2, 2)), np.ones(2), 0.5, steps=[1, 2])
    state = scorer.initial_state(1)[0]
    score = scorer.update(state, np.array([[2.0, np.nan], [np.nan, 0.0]]))
    np.testing.assert_allclose(state, [2.5, 1.0, 1.0, 0.5])
    assert score == pytest.approx(np.sqrt(2.5))


def slow_scorer(recent_alpha: float | None) -> ResidualScorer:
    """Two steps, two targets; slow channels with gain 3 (their level weighs 9x a fast channel's)."""
    return ResidualScorer(np.zeros((2, 2)), np.ones((2, 2)), np.ones(2), 0.4, steps=[1, 2], slow_alpha=0.02, slow_gain=3.0,
                          slow_clip=5.0, slow_recent_alpha=recent_alpha)


def run_scores(scorer: ResidualScorer, z_temp: list[float]) -> list[float]:
    """Scores of samples whose temp residual is z_temp at every step (current residual 1, its healthy level)."""
    state = scorer.initial_state(1)[0]
    return [scorer.update(state, np.array([[z, 1.0], [z, 1.0]])) for z in z_temp]


def test_slow_channels_raise_the_score_on_a_sustained_moderate_rise():
    """A residual held at 2 sigma (fast level 2) lifts the slow level to 2 x gain = 6, with or without recent channels."""
    for recent in (None, 0.1):
        scores = run_scores(slow_scorer(recent), [2.0] * 400)
        assert scores[-1] == pytest.approx(6.0, rel=0.01)


def test_recent_channels_end_the_slow_level_soon_after_the_rise_ends():
    """After a sustained rise, back-to-normal residuals bring the score near its healthy level (gain x 1 = 3) within
    30 samples with the recent channels; the long EWMA alone still holds it far higher."""
    rise, normal = [2.0] * 400, [1.0] * 30
    with_recent = run_scores(slow_scorer(0.1), rise + normal)[-1]
    long_only = run_scores(slow_scorer(None), rise + normal)[-1]
    assert with_recent < 3.3 < 4.5 < long_only


def test_recent_channels_keep_a_short_burst_from_building_a_slow_level():
    """The slow level is the smaller of long and recent: a burst that the recent EWMA forgets leaves no slow level."""
    scores = run_scores(slow_scorer(0.1), [1.0] * 50 + [5.0] * 3 + [1.0] * 40)
    assert scores[-1] < 3.2  # back at about gain x 1 although the long EWMA still holds the burst


@pytest.mark.parametrize("n_targets", [1, 2])
def test_prepared_updates_equal_plain_updates_with_recent_channels(n_targets):
    """prepare + update_prepared (the pipeline's path) give the same scores and state as update, NaN channels included,
    and the score is sqrt(max(fast channels, gain**2 x max over targets of min(long, recent)))."""
    T = n_targets
    scorer = ResidualScorer(np.zeros((2, T)), np.ones((2, T)), np.ones(T), 0.4, steps=[1, 2], slow_alpha=0.02, slow_gain=3.0,
                            slow_clip=5.0, slow_recent_alpha=0.1)
    rng = np.random.default_rng(3)
    z = rng.normal(scale=2.0, size=(60, 2, T))
    z[::7, 1, 0] = np.nan
    plain, fast = scorer.initial_state(1)[0], scorer.initial_state(1)[0]
    weighted_sq, missing = scorer.prepare(z)
    for k in range(len(z)):
        score = scorer.update(plain, z[k])
        assert score == pytest.approx(scorer.update_prepared(fast, weighted_sq[k], bool(missing[k])))
        long, recent = plain[2 * T : 3 * T], plain[3 * T :]
        assert score == pytest.approx(np.sqrt(max(plain[: 2 * T].max(), 9.0 * np.minimum(long, recent).max())))
    np.testing.assert_allclose(plain, fast)


def test_recent_channels_need_slow_channels():
    """slow_recent_alpha without slow_alpha (or outside (0, 1]) is refused."""
    with pytest.raises(ValueError, match="slow_recent_alpha"):
        ResidualScorer(np.zeros((1, 1)), np.ones((1, 1)), np.ones(1), 0.2, slow_recent_alpha=0.1)
    with pytest.raises(ValueError, match="slow_recent_alpha"):
        ResidualScorer(np.zeros((1, 1)), np.ones((1, 1)), np.ones(1), 0.2, slow_alpha=0.02, slow_recent_alpha=1.5)


def test_score_steps_must_lie_within_the_horizon():
    """score_steps outside 1..horizon are refused with a message naming them."""
    with pytest.raises(ValueError, match="1..horizon"):
        ResidualScorer(np.zeros((3, 1)), np.ones((3, 1)), np.ones(1), 0.2, steps=[1, 4])


def test_flat_line_raises_the_score_after_the_calibrated_repeats_and_names_the_sensor():
    """A target repeating exactly the same value flatline_repeats times opens an alert naming it (capped below critical)."""
    detector = make_detector(alpha=0.2, flatline_repeats=[5, 0], min_samples_over=1, update_every_samples=1000)
    rng = np.random.default_rng(1)
    events = []
    for k in range(30):
        observed = np.array([50.0 if k >= 10 else 50.0 + rng.normal(), 20.0 + rng.normal() * 0.1])
        _, event = detector.observe(0, "pump-01", 60.0 * k, observed, np.array([50.0, 20.0]))
        if event is not None:
            events.append((k, event))
    # value stuck from k = 10: repeats 1.. from k = 11, the 5th repeat at k = 15
    assert [(k, e.state, e.severity) for k, e in events] == [(15, "new", "warning")]
    assert events[0][1].features[0].name == "temp"
    assert detector.score[0] <= 1.5 * detector.warning + 1e-9


def test_flat_line_check_is_off_without_calibration():
    """Without flatline_repeats (older bundles) exact repeats never raise the score."""
    detector = make_detector(alpha=1.0)
    feed(detector, [0.0] * 50)
    assert detector.score[0] == 0.0 and detector.open == {}


def test_flapping_alerts_are_held_back_for_a_flap_window():
    """After flap_max_alerts alerts opened within flap_window_samples, the next end is followed by a long cooldown."""
    detector = make_detector(cooldown_samples=0, min_samples_over=1, min_samples_under=1, update_every_samples=1000,
                             flap_window_samples=50, flap_max_alerts=2)
    events = feed(detector, [4, 1, 4, 1, 4, 1, 4, 1] + [1] * 50 + [4, 1])
    assert [(k, e.state) for k, e in events] == [(0, "new"), (1, "end"), (2, "new"), (3, "end"), (58, "new"), (59, "end")]
    assert detector.counters["flap_suppressed"] == 1


def test_without_flap_suppression_every_burst_alerts():
    """flap_window_samples = 0 turns flap suppression off (the cooldown alone applies)."""
    detector = make_detector(cooldown_samples=0, min_samples_over=1, min_samples_under=1, flap_window_samples=0)
    assert len([e for _, e in feed(detector, [4, 1] * 6) if e.state == "new"]) == 6


def test_dynamic_threshold_sits_between_the_noise_and_an_excursion():
    """Hundman's eps: above a window's ordinary scores, below the isolated excursion it should flag."""
    from agent.core.detect import dynamic_threshold

    rng = np.random.default_rng(0)
    scores = 1.0 + 0.1 * rng.standard_normal(500)
    scores[300:305] = 3.0
    eps = dynamic_threshold(scores, np.arange(2.0, 10.5, 0.5))
    assert scores[:300].max() < eps < 3.0


def test_dynamic_mode_adapts_each_devices_warning_and_keeps_the_floor():
    """threshold_mode=dynamic: a noisier device gets a higher warning, a quiet one never goes below the floor."""
    detector = make_detector(alpha=1.0, threshold_mode="dynamic", dynamic_window=100, dynamic_every=10, dynamic_floor=0.5)
    rng = np.random.default_rng(2)
    expected = np.array([50.0, 20.0])
    for k in range(200):
        for d, spread in ((0, 0.2), (1, 2.0)):
            z = abs(rng.normal()) * spread
            detector.observe(d, f"p{d}", 60.0 * k, expected + np.array([z * SCALE[0], 0.0]), expected)
    assert detector.warn[0] == pytest.approx(0.5 * detector.warning)  # floor
    assert detector.warn[1] > detector.warning  # its own noise reaches the fixed warning
