"""Model bundle: manifest + model.onnx, verified before use, run with onnxruntime.

A bundle that does not match its manifest (checksum, feature lists, input/output shapes, scaler) is refused
with a BundleError that names the mismatch; nothing half-verified ever reaches the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from agent.ops.releases import ReleaseError, release_info

SCHEMA_VERSION = 1
SCALER_TYPES = ("standard", "minmax")


class BundleError(Exception):
    """The model bundle cannot be used; the message says exactly what is wrong."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise BundleError(message)


def _positive_int(manifest: dict, key: str) -> int:
    value = manifest.get(key)
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"manifest.{key} must be a positive integer, got {value!r}")
    return value


def _name_list(manifest: dict, key: str) -> list[str]:
    names = manifest.get(key)
    _require(
        isinstance(names, list) and names and all(isinstance(n, str) and n for n in names),
        f"manifest.{key} must be a non-empty list of names, got {names!r}",
    )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    _require(not duplicates, f"manifest.{key} lists {duplicates} more than once")
    return names


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _scaler_arrays(scaler: Any, features: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (offset, scale) with scaled = (x - offset) / scale, from the manifest's scaler section."""
    _require(isinstance(scaler, dict), "manifest.scaler is missing")
    kind = scaler.get("type")
    _require(kind in SCALER_TYPES, f"manifest.scaler.type must be one of {SCALER_TYPES}, got {kind!r}")
    params = scaler.get("params")
    _require(isinstance(params, dict), "manifest.scaler.params is missing")
    missing = [f for f in features if f not in params]
    _require(not missing, f"manifest.scaler.params lacks parameters for feature(s) {missing}")
    offset = np.empty(len(features), dtype=np.float64)
    scale = np.empty(len(features), dtype=np.float64)
    for i, name in enumerate(features):
        p = params[name]
        keys = ("mean", "std") if kind == "standard" else ("min", "max")
        _require(
            isinstance(p, dict) and all(_finite(p.get(k)) for k in keys),
            f"manifest.scaler.params.{name} needs finite {keys[0]!r} and {keys[1]!r}, got {p!r}",
        )
        if kind == "standard":
            offset[i], scale[i] = p["mean"], p["std"]
        else:
            offset[i], scale[i] = p["min"], p["max"] - p["min"]
        _require(scale[i] > 0, f"manifest.scaler.params.{name} has a zero or negative spread ({p!r})")
    return offset, scale


def _check_calibration(calibration: Any, horizon: int, n_targets: int) -> dict:
    _require(isinstance(calibration, dict), "manifest.calibration is missing (the detector needs it)")
    for key in ("residual_mean", "residual_std"):
        try:
            array = np.asarray(calibration.get(key), dtype=np.float64)
        except (TypeError, ValueError):
            raise BundleError(f"manifest.calibration.{key} must be a [horizon][n_targets] array of numbers") from None
        _require(
            array.ndim == 2 and array.shape[1] == n_targets and 1 <= array.shape[0] <= horizon,
            f"manifest.calibration.{key} has shape {array.shape}, expected ({horizon}, {n_targets})",
        )
        _require(bool(np.isfinite(array).all()), f"manifest.calibration.{key} holds non-finite values")
    alpha = calibration.get("ewma_alpha")
    _require(_finite(alpha) and 0 < alpha <= 1, f"manifest.calibration.ewma_alpha must be in (0, 1], got {alpha!r}")
    thresholds = calibration.get("thresholds")
    _require(isinstance(thresholds, dict), "manifest.calibration.thresholds is missing")
    for key in ("warning", "critical", "exit"):
        _require(_finite(thresholds.get(key)) and thresholds[key] > 0, f"manifest.calibration.thresholds.{key} must be a positive number, got {thresholds.get(key)!r}")
    _require(
        thresholds["exit"] <= thresholds["warning"] <= thresholds["critical"],
        f"manifest.calibration.thresholds must satisfy exit <= warning <= critical, got {thresholds}",
    )
    return calibration


def _dims(node: Any) -> list:
    return list(node.shape)


def _is_dynamic(dim: Any) -> bool:
    return not isinstance(dim, int) or dim <= 0


class Bundle:
    """A verified model bundle with its onnxruntime session. predict() works in original units."""

    def __init__(self, path: Path, manifest: dict, session: ort.InferenceSession, sha256: str):
        self.path = path
        self.manifest = manifest
        self.session = session
        self.sha256 = sha256
        self.signed = False  # set by load_bundle when a signature was verified
        self.signed_by: bytes | None = None  # the trusted public key that made the signature
        self.manifest_sha256 = ""  # of manifest.json's bytes (what the signature covers), set by load_bundle
        self.release_info = release_info(manifest)  # release number, expiry, rollback marker (agent/ops/releases.py)
        self.name: str = manifest["name"]
        self.version: str = manifest["version"]
        self.features: list[str] = list(manifest["features"])
        self.targets: list[str] = list(manifest["targets"])
        self.lookback: int = manifest["lookback"]
        self.horizon: int = manifest["horizon"]
        self.period_s: float = float(manifest["sampling_period_s"])
        self.calibration: dict = manifest["calibration"]
        self.offset, self.scale = _scaler_arrays(manifest["scaler"], self.features)  # (F,) each, float64
        self.target_index = np.array([self.features.index(t) for t in self.targets], dtype=np.intp)
        self.target_offset = self.offset[self.target_index]  # (T,)
        self.target_scale = self.scale[self.target_index]  # (T,)
        self.input_name: str = manifest["onnx"].get("input", "x")
        self.output_name: str = manifest["onnx"].get("output", "y")
        # float32 copies for the hot path: scaled = x * inv_scale + shift
        self._inv_scale32 = (1.0 / self.scale).astype(np.float32)
        self._shift32 = (-self.offset / self.scale).astype(np.float32)
        self._tscale32 = self.target_scale.astype(np.float32)
        self._toffset32 = self.target_offset.astype(np.float32)
        from agent.core.intervals import IntervalError, load_intervals

        try:
            self.intervals = load_intervals(manifest)  # prediction bands of the forecasts; None for bundles without
        except IntervalError as exc:
            raise BundleError(f"manifest.calibration.intervals: {exc}") from None

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    def run_scaled(self, x_scaled: np.ndarray) -> np.ndarray:
        """Raw model call: (B, L, F) scaled float32 -> (B, H, T) scaled float32."""
        return self.session.run([self.output_name], {self.input_name: x_scaled})[0]

    def scale_inputs(self, x: np.ndarray) -> None:
        """In place: (B, L, F) float32 in original units -> the model's input units (the same operations as
        predict(), so the same values)."""
        x *= self._inv_scale32
        x += self._shift32

    def unscale_outputs(self, y: np.ndarray) -> np.ndarray:
        """(B, H, T) float32 model outputs -> original units, in place (returned)."""
        y *= self._tscale32
        y += self._toffset32
        return y

    # Told (batch size, seconds) after every model call; the daemon's metrics set it. None: nothing measured.
    observer: Callable[[int, float], None] | None = None

    def predict(self, x_raw: np.ndarray) -> np.ndarray:
        """(B, L, F) float32 in original units -> (B, H, T) float32 forecasts in original units."""
        started = time.perf_counter()
        x = np.asarray(x_raw, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (self.lookback, self.n_features):
            raise ValueError(f"predict expects (batch, {self.lookback}, {self.n_features}), got {x.shape}")
        scaled = x * self._inv_scale32  # (B, L, F)
        scaled += self._shift32
        y = self.unscale_outputs(self.run_scaled(scaled))  # (B, H, T)
        if self.observer is not None:
            self.observer(x.shape[0], time.perf_counter() - started)
        return y

    @property
    def release(self) -> int | None:
        return self.release_info.release

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def verify_signature(folder: Path, manifest_bytes: bytes, public_key: bytes | list[bytes] | None, require_signature: bool) -> bytes | None:
    """Check `manifest.json.sig` (ed25519 over the manifest's bytes) against the trusted key(s) `public_key`.

    The key that made a valid signature; None when the bundle is unsigned and that is allowed.
    Raises BundleError when a signature is required but missing, malformed, or made by a key not trusted.
    """
    from agent.core.signing import SIGNATURE_FILE, SignatureError, key_id, parse_hex, verify_any

    keys = [public_key] if isinstance(public_key, (bytes, bytearray)) else list(public_key or [])
    sig_path = folder / SIGNATURE_FILE
    if not keys:
        _require(not require_signature, "model.require_signature is set but no public key is configured")
        return None
    if not sig_path.is_file():
        _require(not require_signature, f"the bundle is not signed ({sig_path} not found) and model.require_signature is set")
        return None
    try:
        signature = parse_hex(sig_path.read_text(encoding="ascii", errors="replace"), 64, f"{sig_path.name}")
        signer = verify_any(keys, manifest_bytes, signature)
    except SignatureError as exc:
        raise BundleError(f"bad signature file: {exc}") from None
    trusted = ", ".join(f"{key_id(k)}..." for k in keys)
    _require(
        signer is not None,
        f"the signature in {sig_path.name} does not match manifest.json and the configured public key"
        f"{'s' if len(keys) > 1 else ''} {trusted}: the bundle was changed after signing or signed by another key",
    )
    return signer


def load_configured_bundle(model_config) -> Bundle:
    """load_bundle with the [model] section's threads and signature settings (key files read here)."""
    try:
        keys = model_config.resolved_public_keys()
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read the model public key: {exc}") from None
    return load_bundle(model_config.path, model_config.intra_op_threads, public_key=keys, require_signature=model_config.require_signature)


def load_bundle(path: str | Path, intra_op_threads: int = 1, public_key: bytes | list[bytes] | None = None, require_signature: bool = False) -> Bundle:
    """Read, verify and warm up a bundle folder; BundleError names the first thing that does not match.

    With `public_key` (one trusted key, or a list of them: any may sign), a `manifest.json.sig` must verify (and must
    exist when `require_signature`). The manifest's release fields are validated (agent/ops/releases.py); whether the
    release may run is the daemon's release ledger's decision.
    """
    folder = Path(path)
    _require(folder.is_dir(), f"model bundle folder not found: {folder}")
    manifest_path = folder / "manifest.json"
    _require(manifest_path.is_file(), f"{manifest_path} not found (a bundle is model.onnx + manifest.json)")
    manifest_bytes = manifest_path.read_bytes()  # read once: the signed bytes are the parsed bytes
    signer = verify_signature(folder, manifest_bytes, public_key, require_signature)
    try:
        manifest = json.loads(manifest_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from None
    _require(isinstance(manifest, dict), f"{manifest_path} must hold a JSON object")
    schema = manifest.get("schema_version")
    _require(schema == SCHEMA_VERSION, f"manifest.schema_version is {schema!r}; this agent reads schema_version {SCHEMA_VERSION}")
    for key in ("name", "version"):
        _require(isinstance(manifest.get(key), str) and manifest[key], f"manifest.{key} must be a non-empty string")
    try:
        release_info(manifest)
    except ReleaseError as exc:
        raise BundleError(str(exc)) from None

    features = _name_list(manifest, "features")
    targets = _name_list(manifest, "targets")
    not_features = [t for t in targets if t not in features]
    _require(not not_features, f"manifest.targets {not_features} are not among manifest.features {features}")
    lookback = _positive_int(manifest, "lookback")
    horizon = _positive_int(manifest, "horizon")
    period = manifest.get("sampling_period_s")
    _require(_finite(period) and period > 0, f"manifest.sampling_period_s must be a positive number, got {period!r}")
    _scaler_arrays(manifest.get("scaler"), features)

    onnx_info = manifest.get("onnx")
    _require(isinstance(onnx_info, dict), "manifest.onnx is missing")
    model_file = folder / str(onnx_info.get("file", "model.onnx"))
    _require(model_file.is_file(), f"{model_file} not found")
    expected_sha = onnx_info.get("sha256")
    _require(isinstance(expected_sha, str) and len(expected_sha) == 64, "manifest.onnx.sha256 must be a 64-digit hex string")
    actual_sha = sha256_file(model_file)
    _require(
        actual_sha == expected_sha.lower(),
        f"sha256 of {model_file.name} is {actual_sha}, manifest.onnx.sha256 says {expected_sha}: the file was changed or corrupted",
    )

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # onnxruntime's CPU arena on: without it every call's buffers came from malloc and went back, faulted in anew
    # (~1 page fault per window) and fragmenting the heap: with it the model thread spends ~2 us less per window
    # and the daemon holds ~6 MiB less at 10,000 devices (docs/benchmarks.md). No memory pattern: batch sizes change
    # from call to call.
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = False
    try:
        session = ort.InferenceSession(str(model_file), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"onnxruntime cannot load {model_file}: {exc}") from None

    inputs, outputs = session.get_inputs(), session.get_outputs()
    input_name = onnx_info.get("input", "x")
    output_name = onnx_info.get("output", "y")
    _require(
        [i.name for i in inputs] == [input_name],
        f"model inputs are {[i.name for i in inputs]}, manifest.onnx.input says [{input_name!r}]",
    )
    _require(output_name in [o.name for o in outputs], f"model outputs are {[o.name for o in outputs]}, manifest.onnx.output says {output_name!r}")
    model_in = inputs[0]
    model_out = next(o for o in outputs if o.name == output_name)
    _require(model_in.type == "tensor(float)", f"model input {input_name!r} is {model_in.type}, expected tensor(float)")
    _require(model_out.type == "tensor(float)", f"model output {output_name!r} is {model_out.type}, expected tensor(float)")
    _check_shape(f"input {input_name!r}", _dims(model_in), [lookback, len(features)], ("lookback", "n_features"))
    _check_shape(f"output {output_name!r}", _dims(model_out), [horizon, len(targets)], ("horizon", "n_targets"))
    _check_calibration(manifest.get("calibration"), horizon, len(targets))

    bundle = Bundle(folder, manifest, session, actual_sha)
    bundle.signed = signer is not None
    bundle.signed_by = signer
    bundle.manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    _warm_up(bundle)
    return bundle


def _check_shape(what: str, dims: list, expected: list[int], names: tuple[str, str]) -> None:
    _require(len(dims) == 3, f"model {what} has {len(dims)} dimensions {dims}, expected 3 [batch, {names[0]}, {names[1]}]")
    _require(_is_dynamic(dims[0]), f"model {what} has a fixed batch size {dims[0]}; the batch axis must be dynamic")
    for dim, want, label in zip(dims[1:], expected, names):
        # Symbolic inner dimensions are checked by the warm-up run instead.
        if isinstance(dim, int) and dim > 0:
            _require(dim == want, f"model {what} has {label} {dim}, manifest says {want} (shape {dims})")


def _warm_up(bundle: Bundle) -> None:
    """Two batch sizes through the real session: checks the dynamic batch axis, output shape and finiteness."""
    x = np.broadcast_to(bundle.offset.astype(np.float32), (3, bundle.lookback, bundle.n_features)).copy()  # (3, L, F)
    for batch in (1, 3):
        try:
            y = bundle.predict(x[:batch])
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"warm-up inference failed with batch {batch}: {exc}") from None
        expected = (batch, bundle.horizon, bundle.n_targets)
        _require(y.shape == expected, f"warm-up output has shape {y.shape}, expected {expected} (horizon, n_targets from the manifest)")
        _require(bool(np.isfinite(y).all()), "warm-up output holds NaN or infinity")
