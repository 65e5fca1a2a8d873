"""Model bundle loading: verification against the manifest, refusal with a named reason, scaling, batching."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from bundles import PUMP_BUNDLE, PUMP_FEATURES, build_bundle

from agent.core.model import BundleError, load_bundle


@pytest.fixture(scope="module")
def pump():
    return load_bundle(PUMP_BUNDLE)


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(PUMP_BUNDLE, target)
    return target


def edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def refusal(folder: Path) -> str:
    with pytest.raises(BundleError) as caught:
        load_bundle(folder)
    return str(caught.value)


def test_shipped_bundle_loads_with_manifest_attributes(pump):
    """The shipped pump-lstm bundle verifies and exposes the manifest's names and shapes."""
    manifest = json.loads((PUMP_BUNDLE / "manifest.json").read_text())
    assert pump.features == PUMP_FEATURES == manifest["features"]
    assert pump.targets == manifest["targets"]
    assert (pump.lookback, pump.horizon, pump.period_s) == (manifest["lookback"], manifest["horizon"], manifest["sampling_period_s"])
    assert pump.sha256 == hashlib.sha256((PUMP_BUNDLE / "model.onnx").read_bytes()).hexdigest()
    assert pump.name == manifest["name"] and pump.version == manifest["version"]


def test_predict_scales_inputs_and_unscales_outputs(pump):
    """predict() = unscale(model(scale(x))) with the manifest's per-feature parameters."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, pump.lookback, pump.n_features)) * pump.scale + pump.offset).astype(np.float32)  # (B, L, F)
    scaled = ((x - pump.offset) / pump.scale).astype(np.float32)
    manual = pump.run_scaled(scaled) * pump.target_scale + pump.target_offset  # (B, H, T)
    np.testing.assert_allclose(pump.predict(x), manual, rtol=1e-5, atol=1e-4)
    assert pump.predict(x).shape == (3, pump.horizon, pump.n_targets)


def test_batch_axis_is_dynamic_and_rows_independent(pump):
    """A window's forecast does not depend on the batch it is in (batch 1, 7 and 64)."""
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(64, pump.lookback, pump.n_features)) * pump.scale + pump.offset).astype(np.float32)
    full = pump.predict(x)
    np.testing.assert_allclose(pump.predict(x[:7]), full[:7], atol=1e-4)
    np.testing.assert_allclose(pump.predict(x[5:6]), full[5:6], atol=1e-4)


def test_target_subset_is_unscaled_with_the_targets_parameters(tmp_path):
    """With targets a subset of features, outputs use the targets' own scaler parameters."""
    folder = build_bundle(tmp_path / "multi", features=PUMP_FEATURES, targets=["motor_current"], lookback=5, horizon=2, means=[55, 3, 20, 4], stds=[4, 0.5, 2, 0.3])
    bundle = load_bundle(folder)
    x = np.random.default_rng(2).normal(20, 2, size=(2, 5, 4)).astype(np.float32)
    # The synthetic model is "persistence": the last motor_current, in original units, H times.
    np.testing.assert_allclose(bundle.predict(x)[:, :, 0], np.repeat(x[:, -1:, 2], 2, axis=1), rtol=1e-5)


def test_refuses_tampered_model_file(bundle_copy):
    """A model.onnx whose sha256 differs from the manifest is refused, naming the checksum."""
    data = bytearray((bundle_copy / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bundle_copy / "model.onnx").write_bytes(bytes(data))
    assert "sha256" in refusal(bundle_copy)


def test_refuses_feature_list_that_does_not_match_the_model(bundle_copy):
    """A manifest listing fewer features than the model's input is refused, naming n_features."""
    edit_manifest(bundle_copy, lambda m: (m.__setitem__("features", m["features"][:3]), m.__setitem__("targets", m["features"][:3])))
    message = refusal(bundle_copy)
    assert "n_features" in message and "4" in message and "3" in message


def test_refuses_targets_outside_features(bundle_copy):
    """Targets must be a subset of features."""
    edit_manifest(bundle_copy, lambda m: m["targets"].__setitem__(0, "humidity"))
    assert "humidity" in refusal(bundle_copy)


def test_refuses_wrong_lookback(bundle_copy):
    """A manifest lookback that differs from the ONNX input is refused, naming lookback."""
    edit_manifest(bundle_copy, lambda m: m.__setitem__("lookback", 30))
    assert "lookback" in refusal(bundle_copy)


def test_refuses_wrong_horizon(bundle_copy):
    """A manifest horizon that differs from the ONNX output is refused, naming horizon."""
    edit_manifest(bundle_copy, lambda m: m.__setitem__("horizon", 12))
    assert "horizon" in refusal(bundle_copy)


def test_refuses_missing_scaler_parameters(bundle_copy):
    """Every feature needs scaler parameters."""
    edit_manifest(bundle_copy, lambda m: m["scaler"]["params"].pop("vibration_rms"))
    assert "vibration_rms" in refusal(bundle_copy)


def test_refuses_other_schema_version(bundle_copy):
    """Only schema_version 1 is read."""
    edit_manifest(bundle_copy, lambda m: m.__setitem__("schema_version", 2))
    assert "schema_version" in refusal(bundle_copy)


def test_refuses_wrong_input_name(bundle_copy):
    """The manifest's onnx.input must be the model's input name."""
    edit_manifest(bundle_copy, lambda m: m["onnx"].__setitem__("input", "inputs"))
    assert "inputs" in refusal(bundle_copy)


def test_refuses_missing_files(tmp_path):
    """A folder without a manifest, or no folder at all, is refused with the path."""
    assert "manifest.json" in refusal(tmp_path)
    assert "not found" in refusal(tmp_path / "absent")


def test_refuses_fixed_batch_axis(tmp_path):
    """A model exported without a dynamic batch axis cannot serve batched inference and is refused."""
    folder = build_bundle(tmp_path / "fixed", lookback=4, horizon=2, dynamic_batch=False)
    assert "batch" in refusal(folder)
