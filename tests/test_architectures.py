"""Every architecture x strategy trains, exports to ONNX that matches PyTorch, and runs in the daemon's loader."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from agent.core.model import load_bundle
from training.architectures import ARCHITECTURES, CoreConfig
from training.bundle import export_bundle
from training.data import prepare
from training.strategies import STRATEGIES, Forecaster
from simulation.synth import FleetConfig, generate_fleet
from training.train import TrainConfig, fit

pytestmark = pytest.mark.training

LOOKBACK, HORIZON = 24, 3
TARGETS = ["bearing_temp", "motor_current"]  # a subset: recursive/dirrec must carry the other features forward


@pytest.fixture(scope="module")
def small():
    rows = generate_fleet(FleetConfig(devices=2, hours=10.0, seed=5, faults="none")).rows
    return prepare(rows, lookback=LOOKBACK, horizon=HORIZON, targets=TARGETS)


def _tiny(arch: str, strategy: str, **extra) -> TrainConfig:
    settings = dict(lookback=LOOKBACK, horizon=HORIZON, hidden_size=8, num_layers=1, dropout=0.0, epochs=1,
                    batch_size=32, max_batches=2, architecture=arch, strategy=strategy, conv_channels=4)
    return TrainConfig(**{**settings, **extra})


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_strategy_exports_and_runs_in_the_daemon_loader(small, arch, strategy, tmp_path):
    """Trains briefly, exports; ONNX == PyTorch within 1e-5 at batch 1, 7, 64; agent.core.model.load_bundle predicts."""
    cfg = _tiny(arch, strategy, difference=(arch == "many_to_one"))  # differencing in the graph too, once per strategy
    result = fit(small, cfg, log=lambda *_: None)
    out = tmp_path / "bundle"
    manifest = export_bundle(result.model, small, cfg, out, name=f"{arch}-{strategy}", history=result.history,
                             reports=False, log=lambda *_: None)
    assert manifest["strategy"] == strategy and manifest["architecture"]["type"] == arch
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for batch in (1, 7, 64):
        x = rng.standard_normal((batch, LOOKBACK, 4)).astype(np.float32)
        with torch.no_grad():
            expected = result.model(torch.from_numpy(x)).numpy()
        got = session.run(["y"], {"x": x})[0]
        assert got.shape == (batch, HORIZON, len(TARGETS))
        assert np.abs(got - expected).max() <= 1e-5
    bundle = load_bundle(out)
    raw, _ = small.windows(small.starts["test"][:5])
    raw = small.scaler.inverse(raw).astype(np.float32)  # (5, L, F) original units
    forecast = bundle.predict(raw)
    assert forecast.shape == (5, HORIZON, len(TARGETS)) and np.isfinite(forecast).all()


def test_bundle_records_differencing_and_reports(small, tmp_path):
    """A run writes report.json, report.md and the three PNGs next to the bundle; the manifest says differenced."""
    cfg = _tiny("many_to_one", "mimo", difference=True, epochs=2)
    result = fit(small, cfg, log=lambda *_: None)
    export_bundle(result.model, small, cfg, tmp_path / "b", name="d", history=result.history, log=lambda *_: None)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["preprocessing"] == {"difference": True, "in_graph": True}
    for name in ("report.json", "report.md", "learning_curves.png", "forecast_vs_actual.png", "residuals.png"):
        assert (tmp_path / "b" / name).stat().st_size > 100, name
    assert (tmp_path / "b" / "residuals.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert len(report["history"]) == 2 and "seasonal_naive" in report["metrics"]["test"]


def test_differencing_is_inverted_inside_the_graph():
    """A differenced forecaster is shift-invariant: adding c to every input moves every forecast by exactly c."""
    torch.manual_seed(0)
    model = Forecaster("many_to_one", "mimo", 4, [0, 2], 5, CoreConfig(hidden_size=8, num_layers=1, dropout=0.0), difference=True)
    for p in model.parameters():  # non-trivial weights (the last layer starts at zero)
        torch.nn.init.normal_(p, std=0.3)
    model.eval()
    x = torch.randn(3, 20, 4)
    with torch.no_grad():
        base, shifted = model(x), model(x + 2.5)
    assert not torch.allclose(base, x[:, -1:, [0, 2]].expand(-1, 5, -1))  # it does forecast something
    assert torch.allclose(shifted, base + 2.5, atol=1e-5)


def test_recursive_unrolls_one_step_model_carrying_other_features_forward():
    """Recursive = the one-step core applied H times to its own output; non-target features are carried forward."""
    torch.manual_seed(1)
    model = Forecaster("many_to_one", "recursive", 3, [1], 4, CoreConfig(hidden_size=6, num_layers=1, dropout=0.0))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model.eval()
    x = torch.randn(2, 10, 3)
    with torch.no_grad():
        got = model(x)
        window, expected = x.clone(), []
        for _ in range(4):
            level = window[:, -1, 1] + model.cores[0](window)[:, 0, 0]  # (B,)
            expected.append(level)
            row = window[:, -1:].clone()
            row[:, 0, 1] = level  # the target gets its forecast, features 0 and 2 keep their last value
            window = torch.cat([window[:, 1:], row], dim=1)
    assert torch.allclose(got[:, :, 0], torch.stack(expected, dim=1), atol=1e-6)


def test_direct_uses_one_independent_model_per_step():
    """Direct: H separate cores; changing core h's weights changes step h only."""
    model = Forecaster("many_to_one", "direct", 4, [0, 1, 2, 3], 3, CoreConfig(hidden_size=6, num_layers=1, dropout=0.0)).eval()
    x = torch.randn(2, 12, 4)
    with torch.no_grad():
        before = model(x)
        torch.nn.init.normal_(model.cores[1].head[-1].weight, std=0.5)
        after = model(x)
    assert len(model.cores) == 3
    assert torch.equal(before[:, 0], after[:, 0]) and torch.equal(before[:, 2], after[:, 2])
    assert not torch.allclose(before[:, 1], after[:, 1])


def test_attention_weights_are_available_for_inspection():
    """The attention core exposes its weights: one per input step, non-negative, summing to 1."""
    model = Forecaster("attention", "mimo", 4, [0], 2, CoreConfig(hidden_size=8, num_layers=1, dropout=0.0)).eval()
    x = torch.randn(5, 16, 4)
    with torch.no_grad():
        model(x)
        _, weights = model.cores[0].forward_with_attention(x)
    assert weights.shape == (5, 16) and torch.equal(weights, model.cores[0].last_attention)
    assert (weights >= 0).all() and torch.allclose(weights.sum(dim=1), torch.ones(5))


def test_encoder_decoder_teacher_forcing_in_training_free_running_at_inference():
    """Training feeds the decoder the true previous values; inference ignores them (free running)."""
    torch.manual_seed(2)
    model = Forecaster("encoder_decoder", "mimo", 4, [0, 1], 4, CoreConfig(hidden_size=8, num_layers=1, dropout=0.0, teacher_forcing=1.0))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, y = torch.randn(3, 12, 4), torch.randn(3, 4, 2) * 3
    model.eval()
    with torch.no_grad():
        free = model(x)
        assert torch.equal(model.fit_outputs(x, y)[0], free)  # eval: the truth is not used
        model.train()
        forced = model.fit_outputs(x, y)[0]
    assert torch.equal(forced[:, 0], free[:, 0])  # step 0 sees no earlier truth
    assert not torch.allclose(forced[:, 1:], free[:, 1:])
