"""ONNX export with verification against PyTorch, and the bundle writer (model.onnx + manifest.json).

The bundle is assembled in a staging folder next to the destination and swapped in only when complete, so a
reader never sees a model.onnx whose manifest does not match it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

OPSET = 17
VERIFY_BATCH_SIZES = (1, 7, 64)
MAX_ABS_DIFF = 1e-5


class ExportError(RuntimeError):
    """The exported graph disagrees with its PyTorch original (or could not be produced)."""


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_onnx(model: torch.nn.Module, path: str | Path, lookback: int, n_features: int, seed: int = 0) -> dict:
    """Export tensor-in/tensor-out (`x` -> `y`, dynamic batch), then verify against PyTorch or raise ExportError."""
    model = model.eval()
    example = torch.zeros(2, lookback, n_features)
    with warnings.catch_warnings():
        # The legacy exporter warns about LSTM batch sizes; verification below checks several batch sizes.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    graph = onnx.load(str(path))
    onnx.checker.check_model(graph)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for batch in VERIFY_BATCH_SIZES:
        x = rng.standard_normal((batch, lookback, n_features)).astype(np.float32)  # (B, L, F)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = session.run(["y"], {"x": x})[0]
        if got.shape != expected.shape:
            raise ExportError(f"ONNX output shape {got.shape} != PyTorch {expected.shape} at batch {batch}")
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= MAX_ABS_DIFF:
            raise ExportError(f"ONNX vs PyTorch max abs diff {diff:.3g} > {MAX_ABS_DIFF} at batch {batch}")
        worst = max(worst, diff)
    return {"file": Path(path).name, "sha256": sha256_of(path), "opset": OPSET, "ir_version": int(graph.ir_version),
            "input": "x", "output": "y",
            "verified": {"onnxruntime": ort.__version__, "torch": torch.__version__.split("+")[0],
                         "batch_sizes": list(VERIFY_BATCH_SIZES), "max_abs_diff": worst}}


class OnnxPredictor:
    """Scaled (B, L, F) -> scaled (B, H, T) with onnxruntime, in chunks."""

    def __init__(self, path: str | Path, threads: int = 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray, chunk: int = 1024) -> np.ndarray:
        outs = [self.session.run(["y"], {"x": np.ascontiguousarray(x[i : i + chunk], dtype=np.float32)})[0]
                for i in range(0, len(x), chunk)]
        return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def write_bundle(out_dir: str | Path, staged_onnx: str | Path, manifest: dict, extra_files: dict[str, str | bytes] | None = None) -> Path:
    """Write model.onnx + manifest.json (+ report files) into out_dir, replacing it as a whole."""
    out_dir = Path(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    shutil.copyfile(staged_onnx, staging / "model.onnx")
    if sha256_of(staging / "model.onnx") != manifest["onnx"]["sha256"]:
        raise ExportError("model.onnx changed between verification and writing")
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for name, content in (extra_files or {}).items():  # text (reports) or bytes (plots)
        if isinstance(content, bytes):
            (staging / name).write_bytes(content)
        else:
            (staging / name).write_text(content, encoding="utf-8")
    previous = out_dir.parent / f".{out_dir.name}.previous"
    if previous.exists():
        shutil.rmtree(previous)
    if out_dir.exists():
        out_dir.rename(previous)
    staging.rename(out_dir)
    if previous.exists():
        shutil.rmtree(previous)
    return out_dir
