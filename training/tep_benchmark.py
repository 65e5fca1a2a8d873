"""The Tennessee Eastman (TEP) protocol of ../shared/data/tep/README.md, run as a user runs edgecast.

1. `python -m training fit --data d00.csv --out DIR` (a subprocess, default settings: the 500 normal rows);
2. every test file (d00_te, d01_te .. d21_te) through `agent replay`'s code path with that bundle;
3. false-alarm rate (alert open) on d00_te and on rows 1..160 of each fault file, fault detection rate on rows
   161..960, detection delay (samples from the fault's start to the first alert that then stays open for
   DELAY_RUN samples or to the end of the file).
Beside it, in the same run: classical PCA (T^2 + SPE, 14 components, 99.9th percentiles on d00; the README's
anchor) and the time a new user waits for `fit` on 400 rows plus `replay` of 1,200 rows.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FAULTS = range(1, 22)
UNDETECTABLE = (3, 9, 15)
FAULT_START = 160  # rows 0..159 of a fault file are normal
DELAY_RUN = 10


def default_tep_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tep"


def _read(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    data = np.array([[float(v) for v in r[1:]] for r in body])  # (N, 53): 52 variables + label
    has_label = header[-1] == "label"
    return header, data[:, :-1] if has_label else data, data[:, -1] if has_label else np.zeros(len(body))


def detection_delay(alert: np.ndarray, start: int = FAULT_START, run: int = DELAY_RUN) -> int | None:
    """Samples from `start` to the first alert row that opens a run of `run` open rows (or reaches the end)."""
    for i in range(start, len(alert)):
        if alert[i] and alert[i : i + run].all():
            return i - start
    return None


def score_alerts(alerts: dict[int, np.ndarray]) -> dict:
    """alerts: file number (0 = d00_te) -> alert column (0/1) -> FAR, FDR and delay per fault and summaries."""
    per_fault = {}
    for k in FAULTS:
        a = alerts[k]
        per_fault[k] = {"fdr": float(a[FAULT_START:].mean()), "far_prefault": float(a[:FAULT_START].mean()),
                        "delay_samples": detection_delay(a)}
    detectable = [per_fault[k]["fdr"] for k in FAULTS if k not in UNDETECTABLE]
    return {"far_d00_te": float(alerts[0].mean()), "far_prefault_mean": float(np.mean([f["far_prefault"] for f in per_fault.values()])),
            "far_prefault_max": float(max(f["far_prefault"] for f in per_fault.values())),
            "fdr_18": float(np.mean(detectable)), "fdr_21": float(np.mean([f["fdr"] for f in per_fault.values()])),
            "per_fault": per_fault}


def pca_anchor(tep: Path, components: int = 14, quantile: float = 0.999) -> dict:
    """The README's classical PCA: standardized on d00, T^2 and SPE each over its 99.9th percentile on d00."""
    _, train, _ = _read(tep / "d00.csv")
    mean, std = train.mean(axis=0), train.std(axis=0)
    z = (train - mean) / std
    eigenvalues, vectors = np.linalg.eigh(np.cov(z.T))
    order = np.argsort(eigenvalues)[::-1][:components]
    P, lam = vectors[:, order], eigenvalues[order]  # (F, k), (k,)

    def stats(x):
        zx = (x - mean) / std
        t = zx @ P
        return (t**2 / lam).sum(axis=1), ((zx - t @ P.T) ** 2).sum(axis=1)

    t2, spe = stats(train)
    limits = np.quantile(t2, quantile), np.quantile(spe, quantile)
    flags = {}
    for k in (0, *FAULTS):
        a, b = stats(_read(tep / f"d{k:02d}_te.csv")[1])
        flags[k] = ((a > limits[0]) | (b > limits[1])).astype(np.int8)
    return score_alerts(flags)


def replay_all(model: Path, tep: Path, work: Path) -> dict[int, np.ndarray]:
    from agent.tools.replay import replay

    alerts = {}
    for k in (0, *FAULTS):
        out = work / f"replay-d{k:02d}.csv"
        replay(model, tep / f"d{k:02d}_te.csv", out)
        with open(out, newline="", encoding="utf-8") as f:
            alerts[k] = np.array([int(r["alert"]) for r in csv.DictReader(f)], dtype=np.int8)
    return alerts


def new_user_timing(tep: Path, work: Path) -> dict:
    """`fit --rows 400` plus `replay` of 1,200 rows, each a fresh process as a user runs them (wall seconds)."""
    data = work / "tep-1200.csv"
    with open(tep / "d00_te.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    with open(tep / "d01_te.csv", newline="", encoding="utf-8") as f:
        more = list(csv.reader(f))[1 : 1 + 1200 - (len(rows) - 1)]
    step = 180
    last = time.mktime(time.strptime(rows[-1][0], "%Y-%m-%dT%H:%M:%S"))
    for i, r in enumerate(more, 1):
        r[0] = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(last + i * step))
    with open(data, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows + more)
    model = work / "tep-400"
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "training", "fit", "--data", str(tep / "d00.csv"), "--out", str(model), "--rows", "400"],
                   check=True, capture_output=True)
    fitted = time.perf_counter()
    subprocess.run([sys.executable, "-m", "agent", "replay", "--model", str(model), "--data", str(data), "--out", str(work / "tep-1200-scored.csv")],
                   check=True, capture_output=True)
    done = time.perf_counter()
    return {"fit_s": round(fitted - began, 2), "replay_s": round(done - fitted, 2), "total_s": round(done - began, 2), "replay_rows": 1200}


def run_tep(tep: Path, out: Path, variants, log=print) -> dict:
    """Fit once with default settings, replay every file with each ablation variant of the bundle."""
    if not (tep / "d00.csv").is_file():
        raise FileNotFoundError(f"no TEP data in {tep} (d00.csv, dNN_te.csv): give --tep-dir")
    out.mkdir(parents=True, exist_ok=True)
    model = out / "tep-model"
    began = time.perf_counter()
    fit = subprocess.run([sys.executable, "-m", "training", "fit", "--data", str(tep / "d00.csv"), "--out", str(model)],
                         capture_output=True, text=True)
    if fit.returncode != 0:
        raise RuntimeError(f"fit failed:\n{fit.stderr[-2000:]}")
    log(f"tep: fit on d00.csv (500 rows, default settings) in {time.perf_counter() - began:.1f} s -> {model}")
    results = {}
    for name, bundle in variants(model, out / "variants"):
        results[name] = score_alerts(replay_all(bundle, tep, out))
        if name == "full":
            from agent.tools.replay import replay

            replay(bundle, tep / "d00.csv", out / "replay-d00.csv")  # the rows the model was fitted on
            with open(out / "replay-d00.csv", newline="", encoding="utf-8") as f:
                results[name]["far_training_rows"] = float(np.mean([int(r["alert"]) for r in csv.DictReader(f)]))
    results["classical PCA (README anchor)"] = pca_anchor(tep)
    return results


def format_tep(results: dict, timing: dict | None = None) -> str:
    full = results["full"]
    lines = ["## Tennessee Eastman (fit on d00.csv with default settings, replay of every test file)", "",
             "| fault | FDR | delay (samples of 3 min) | FAR rows 1..160 | PCA anchor FDR |", "|---|---|---|---|---|"]
    anchor = results["classical PCA (README anchor)"]["per_fault"]
    for k in FAULTS:
        f = full["per_fault"][k]
        delay = "-" if f["delay_samples"] is None else str(f["delay_samples"])
        note = " (undetectable)" if k in UNDETECTABLE else ""
        lines.append(f"| {k}{note} | {f['fdr']:.3f} | {delay} | {f['far_prefault']:.3f} | {anchor[k]['fdr']:.3f} |")
    lines += ["", "| detector | FAR d00_te | FAR pre-fault (mean / max) | mean FDR, 18 faults | mean FDR, 21 faults |",
              "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['far_d00_te']:.3f} | {r['far_prefault_mean']:.3f} / {r['far_prefault_max']:.3f} | "
                     f"{r['fdr_18']:.3f} | {r['fdr_21']:.3f} |")
    if "far_training_rows" in full:
        lines += ["", f"alerts on the rows the model was fitted on (d00.csv replayed): {full['far_training_rows']:.3f} of the rows"]
    if timing:
        lines += ["", f"new user: `fit --rows 400` {timing['fit_s']} s + `replay` of {timing['replay_rows']} rows "
                      f"{timing['replay_s']} s = {timing['total_s']} s (fresh processes)"]
    return "\n".join(lines)
