"""Training data that streams from a partitioned Parquet dataset, so memory follows a device, not the fleet.

The dataset is a folder read with pyarrow's dataset API: hive-partitioned by device (`device=pump-00/*.parquet`,
what `python -m training to-parquet` writes) or by day (`day=2026-01-05/*.parquet`), or any Parquet files. The
unit of work is one device: its rows are read with a filter (a partition key prunes every other folder), put on
its grid, filled and split by time exactly as training.data does for the whole file (the same functions), so a
window never crosses a split, a long gap or a fault.

- `open_stream` makes one pass over this rank's devices: the scaler (training.data.ScalerAccumulator on each
  device's observed healthy training rows, merged across ranks in rank order, so every rank has the same one)
  and per-device window counts. The period is inferred from the first devices' timestamps unless given.
- `StreamData.train_batches` deals this rank's devices in a shuffled order into a bounded shuffle buffer of
  window references (at most `buffer_windows` windows from at most `live_devices` devices held at once) and
  draws each batch at random from it: windows mix across devices and across time as in the in-memory path.
- `StreamData.val_totals` streams the validation windows device by device: (loss sum, count), which the
  trainer sums over ranks.

Memory: the shard being read (one device's rows, parsed), the shuffle buffer's devices (float32 rows) and the
model. Not the fleet: a Parquet file is never loaded whole. Ranks read disjoint devices (training.distributed.assign).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from training.data import SPLITS, DeviceSeries, ScalerAccumulator, Split, rows_from_frame, to_device_series, window_starts


def is_dataset(path: str | Path) -> bool:
    """A folder (a Parquet dataset) rather than one CSV/Parquet file."""
    return Path(path).is_dir()


def _partition_keys(root: Path) -> list[str]:
    """Hive partition keys (`key=value` folders) on the path of the first Parquet file under `root`."""
    for file in sorted(root.rglob("*.parquet")):
        parts = file.relative_to(root).parts[:-1]
        if not any(p.startswith((".", "_")) for p in parts):
            return [p.split("=", 1)[0] for p in parts if "=" in p]
    return []


class ParquetFleet:
    """A partitioned Parquet dataset read one device at a time."""

    def __init__(self, path: str | Path, ts_column: str | None = None, device_column: str | None = "device",
                 features: list[str] | None = None, label: str = "label"):
        import pyarrow as pa
        import pyarrow.dataset as ds

        from agent.tools.replay import find_ts_column

        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"{path}: not a folder (a Parquet dataset written by `python -m training to-parquet`)")
        self.keys = _partition_keys(self.path)
        partitioning = ds.partitioning(pa.schema([(k, pa.string()) for k in self.keys]), flavor="hive") if self.keys else None
        try:
            self.dataset = ds.dataset(str(self.path), format="parquet", partitioning=partitioning)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise ValueError(f"{path}: cannot read the Parquet dataset: {exc}") from None
        if not self.dataset.files:
            raise ValueError(f"{path}: no Parquet files")
        schema = self.dataset.schema
        names = list(schema.names)
        self.ts_column = find_ts_column(names, ts_column, str(path))
        self.device_column = device_column if device_column and device_column in names else None
        self.label = label
        skip = {self.ts_column, label, "fault", *self.keys} | ({self.device_column} if self.device_column else set())
        if features is None:
            features = [n for n in names if n not in skip and (pa.types.is_integer(schema.field(n).type)
                                                               or pa.types.is_floating(schema.field(n).type))]
        missing = [f for f in features if f not in names]
        if missing or not features:
            raise ValueError(f"{path}: missing feature column(s) {missing or '(none numeric)'}")
        self.features = list(features)
        self.columns = [self.ts_column, *([self.device_column] if self.device_column else []), *self.features,
                        *([label] if label in names else [])]
        self.devices = self._list_devices()

    def _list_devices(self) -> list[str]:
        import pyarrow.compute as pc
        import pyarrow.dataset as ds

        if not self.device_column:
            return ["series"]
        if self.device_column in self.keys:  # from the folder names: no data read
            names = set()
            for fragment in self.dataset.get_fragments():
                names.add(str(ds.get_partition_keys(fragment.partition_expression)[self.device_column]))
            return sorted(names)
        names = set()
        for batch in self.dataset.to_batches(columns=[self.device_column], batch_size=1 << 16):  # one column, in batches
            names.update(str(v) for v in pc.unique(batch.column(0)).to_pylist())
        return sorted(names)

    def read(self, device: str) -> dict[str, np.ndarray]:
        """One device's rows as training.data.load_table returns them."""
        import pyarrow.dataset as ds

        where = ds.field(self.device_column) == device if self.device_column else None
        frame = self.dataset.to_table(columns=self.columns, filter=where).to_pandas()
        if self.device_column:
            frame[self.device_column] = device
        rows, _ = rows_from_frame(frame, f"{self.path} ({device})", self.ts_column, self.device_column, self.features, self.label)
        return rows

    def timestamps(self, device: str) -> np.ndarray:
        """One device's timestamp column only (the period inference)."""
        import pyarrow.dataset as ds

        if not self.device_column:
            return self.read(device)["ts"]
        frame = self.dataset.to_table(columns=[self.ts_column], filter=ds.field(self.device_column) == device).to_pandas()
        return rows_from_frame(frame, str(self.path), self.ts_column, None, [self.ts_column])[0]["ts"]


@dataclass
class PrepareOptions:
    """training.data.prepare's options, applied per device."""

    lookback: int = 60
    horizon: int = 10
    period_s: int = 60
    max_fill_periods: int = 10
    fill: str = "ffill"
    split: Split = field(default_factory=Split)
    scaler: str = "standard"


class StreamData:
    """This rank's devices of a ParquetFleet, with the fleet-wide scaler: what training.train.fit_stream reads."""

    def __init__(self, fleet: ParquetFleet, devices: list[str], features: list[str], targets: list[str],
                 options: PrepareOptions, scaler, counts: dict[str, dict]):
        self.fleet, self.devices, self.features, self.targets = fleet, list(devices), list(features), list(targets)
        self.options, self.scaler, self.counts = options, scaler, counts  # counts: device -> windows/rows per split
        self.lookback, self.horizon, self.period_s = options.lookback, options.horizon, options.period_s
        self.totals: dict = {}  # fleet-wide counts, filled by open_stream

    @property
    def target_index(self) -> np.ndarray:
        return np.array([self.features.index(t) for t in self.targets])

    def series(self, device: str) -> DeviceSeries:
        o = self.options
        rows = self.fleet.read(device)
        return to_device_series(rows, o.period_s, o.max_fill_periods, self.features, fill=o.fill, split=o.split)[0]

    def load(self, device: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(scaled rows (N, F) float32, window starts per split) of one device."""
        s = self.series(device)
        scaled = self.scaler.transform(s.values).astype(np.float32)
        return scaled, {k: window_starts(s, k, self.lookback, self.horizon) for k in SPLITS}

    def train_window_floor(self, stride: int) -> int:
        """Fewest training windows one epoch of this rank yields, whatever the random offsets (batch budget)."""
        return sum(c["windows"]["train"] // stride for c in self.counts.values())

    def sample_inputs(self, n: int = 2048):
        """Up to n training inputs (x only) from the first devices: for models that fit a scale on their data."""
        import torch

        xs, have = [], 0
        for device in self.devices:
            scaled, starts = self.load(device)
            pick = starts["train"][np.linspace(0, len(starts["train"]) - 1, min(len(starts["train"]), n - have)).astype(int)] if len(starts["train"]) else []
            xs += [scaled[s : s + self.lookback] for s in pick]
            have = len(xs)
            if have >= n:
                break
        return torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, self.lookback, len(self.features))

    def _batch(self, arrays: dict, slots: np.ndarray, starts: np.ndarray, target_index):
        import torch

        span = self.lookback + self.horizon
        block = torch.stack([arrays[s][t : t + span] for s, t in zip(slots.tolist(), starts.tolist())])  # (B, L+H, F)
        return block[:, : self.lookback].contiguous(), block[:, self.lookback :].index_select(2, target_index)

    def train_batches(self, rng: np.random.Generator, batch_size: int, stride: int, n_batches: int,
                      buffer_windows: int = 65536, live_devices: int = 64) -> Iterator:
        """`n_batches` batches (x (B, L, F), y (B, H, T)) of `batch_size` training windows drawn at random from a
        bounded shuffle buffer fed by this rank's devices in a random order (every `stride`-th window of each,
        from a random offset). Windows left when the batches are done are skipped (equal batches per rank)."""
        import torch

        target_index = torch.from_numpy(self.target_index.astype(np.int64))
        pending = iter(rng.permutation(len(self.devices)).tolist())
        arrays: dict[int, torch.Tensor] = {}
        remaining: dict[int, int] = {}
        pool_slot = np.zeros(0, np.int64)
        pool_start = np.zeros(0, np.int64)
        exhausted = False
        for _ in range(n_batches):
            while not exhausted and ((len(pool_slot) < buffer_windows and len(arrays) < live_devices) or len(pool_slot) < batch_size):
                index = next(pending, None)
                if index is None:
                    exhausted = True
                    break
                scaled, starts = self.load(self.devices[index])
                train = starts["train"][int(rng.integers(stride)) :: stride]
                if len(train) == 0:
                    continue
                arrays[index], remaining[index] = torch.from_numpy(scaled), len(train)
                pool_slot = np.concatenate([pool_slot, np.full(len(train), index, np.int64)])
                pool_start = np.concatenate([pool_start, train])
            if len(pool_slot) < batch_size:
                return
            pick = rng.choice(len(pool_slot), batch_size, replace=False)
            slots, starts = pool_slot[pick], pool_start[pick]
            keep = np.ones(len(pool_slot), bool)
            keep[pick] = False
            pool_slot, pool_start = pool_slot[keep], pool_start[keep]
            batch = self._batch(arrays, slots, starts, target_index)
            for s, used in zip(*np.unique(slots, return_counts=True)):
                remaining[int(s)] -= int(used)
                if remaining[int(s)] == 0:
                    del arrays[int(s)], remaining[int(s)]
            yield batch

    def val_totals(self, model, batch_size: int, loss: str, huber_delta: float, stride: int, max_batches: int = 0) -> tuple[float, int]:
        """(sum of the loss, number of target values) of the full-horizon forecast over this rank's validation
        windows (every `stride`-th per device); the trainer sums both over ranks."""
        import torch

        from training.train import loss_fn

        fn = loss_fn(loss, huber_delta)
        target_index = torch.from_numpy(self.target_index.astype(np.int64))
        total, count, batches = 0.0, 0, 0
        model.eval()
        with torch.no_grad():
            for device in self.devices:
                scaled, starts = self.load(device)
                val = starts["val"][::stride]
                array = {0: torch.from_numpy(scaled)}
                for i in range(0, len(val), batch_size):
                    part = val[i : i + batch_size]
                    x, y = self._batch(array, np.zeros(len(part), np.int64), part, target_index)
                    total += float(fn(model(x), y, reduction="sum"))
                    count += y.numel()
                    batches += 1
                    if max_batches and batches >= max_batches:
                        return total, count
        return total, count


def open_stream(path: str | Path, options: PrepareOptions, d=None, period_s: int | None = None,
                ts_column: str | None = None, device_column: str | None = "device", features: list[str] | None = None,
                targets: list[str] | None = None, log=print) -> StreamData:
    """Open the dataset, take this rank's devices, and make the one streaming pass: fleet-wide scaler and counts."""
    from training.distributed import Dist, assign
    from training.fit import infer_period

    d = d or Dist()
    fleet = ParquetFleet(path, ts_column, device_column, features)
    features = fleet.features
    targets = list(features if targets is None else targets)
    unknown = [t for t in targets if t not in features]
    if unknown or not targets:
        raise ValueError(f"targets {unknown or targets} must be a non-empty subset of the features {list(features)}")
    if options.split.rows is None and options.split.times is None:
        options.split.bounds(np.zeros(1))  # validates the fractions up front
    if not period_s:  # the median step of the first devices (every rank reads the same ones: the same answer)
        sample = fleet.devices[:8]
        stamps = [fleet.timestamps(name) for name in sample]
        period_s = infer_period(np.concatenate(stamps), np.concatenate([np.full(len(t), i) for i, t in enumerate(stamps)]))
    options.period_s = int(period_s)
    mine = assign(fleet.devices, d)
    data = StreamData(fleet, mine, features, targets, options, scaler=None, counts={})
    acc = ScalerAccumulator(len(features))
    for device in mine:
        s = data.series(device)
        lo, hi = s.bounds["train"]
        acc.add(s.values[lo:hi][s.observed[lo:hi] & s.healthy[lo:hi]])
        data.counts[device] = {
            "windows": {k: int(len(window_starts(s, k, data.lookback, data.horizon))) for k in SPLITS},
            "rows": {k: int((s.observed[a:b] & s.healthy[a:b]).sum()) for k, (a, b) in s.bounds.items()},
        }
    merged = ScalerAccumulator(len(features))
    for part in d.gather(acc.to_array()):  # rank order: every rank merges the same numbers the same way
        merged.merge(ScalerAccumulator.from_array(part))
    data.scaler = merged.scaler(options.scaler)
    local = [len(mine)] + [sum(c["windows"][k] for c in data.counts.values()) for k in SPLITS] + \
            [sum(c["rows"][k] for c in data.counts.values()) for k in SPLITS]
    total = d.sum(local).astype(np.int64).tolist()
    data.totals = {"devices": total[0], "windows": dict(zip(SPLITS, total[1:4])), "rows": dict(zip(SPLITS, total[4:7]))}
    for name in ("train", "val"):
        if data.totals["windows"][name] == 0:
            raise ValueError(f"no healthy {name} windows in {path}: the devices are too short for lookback "
                             f"{data.lookback} + horizon {data.horizon}; give a shorter --lookback/--horizon or more rows")
    return data


def eval_devices(names: list[str], n: int) -> list[str]:
    """`n` devices spread evenly over the sorted names (the fleet sample that export, metrics and calibration use)."""
    names = sorted(names)
    if n <= 0 or n >= len(names):
        return names
    return [names[i] for i in np.linspace(0, len(names) - 1, n).round().astype(int)]


def read_rows(fleet: ParquetFleet, devices: list[str]) -> dict[str, np.ndarray]:
    """The rows of a few devices concatenated (load_table's layout)."""
    parts = [fleet.read(name) for name in devices]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# ----------------------------------------------------------------------------------------- the train command


def add_stream_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Parquet dataset and distributed training (--data FOLDER; docs/distributed.md)")
    g.add_argument("--shuffle-buffer", type=int, default=65536, help="training windows held for shuffling (default 65536)")
    g.add_argument("--shuffle-devices", type=int, default=64, help="most devices whose rows the shuffle buffer holds at once")
    g.add_argument("--eval-devices", type=int, default=4,
                   help="devices (spread over the fleet) that export check, metrics, calibration and report use; 0 = all")
    g.add_argument("--max-val-batches", type=int, default=0, help="validation batches per rank and epoch (0 = all)")
    g.add_argument("--max-batches", type=int, help="training batches per epoch, CSV or dataset (per rank under torchrun); default all")
    g.add_argument("--backend", choices=("auto", "gloo"), default="auto",
                   help="torch.distributed backend under torchrun: gloo (the loop trains on the CPU; NCCL would need CUDA tensors)")


def run_train(args: argparse.Namespace) -> int:
    """`train --data FOLDER`: stream, train (data-parallel under torchrun), and on rank 0 export, evaluate and
    calibrate on a sample of devices, writing the same bundle and report as the in-memory path."""
    import sys

    from training import distributed
    from training.cli import _names, _train_config, build_bundle, data_options
    from training.data import prepare
    from training.train import fit_stream

    cfg = _train_config(args)
    with distributed.session(getattr(args, "backend", "auto")) as d:
        log = print if d.main else (lambda *_: None)
        if d.enabled:
            cfg.threads = 1  # one core per rank: the ranks share the machine's cores
        try:
            options = data_options(args)
            popts = PrepareOptions(cfg.lookback, cfg.horizon, 0, options["max_fill_periods"], options["fill"],
                                   options["split"], options["scaler"])
            data = open_stream(args.data, popts, d, args.period_s, args.ts_column, args.device_column,
                               _names(args.features), _names(args.targets), log)
            log(f"data: {data.totals['devices']} devices in {args.data} ({d.world} rank(s), {len(data.devices)} here), "
                f"windows train {data.totals['windows']['train']} val {data.totals['windows']['val']} "
                f"test {data.totals['windows']['test']}")
            result = fit_stream(data, cfg, log=log, dist=d, buffer_windows=args.shuffle_buffer,
                                live_devices=args.shuffle_devices, max_val_batches=args.max_val_batches)
        except ValueError as exc:
            print(f"train: {exc}", file=sys.stderr)
            return 2
        print(f"rank {d.rank}/{d.world}: trained, peak RSS {peak_rss_mib():.0f} MiB", flush=True)
        if not d.main:
            return 0
        sample = eval_devices(data.fleet.devices, args.eval_devices)
        rows = read_rows(data.fleet, sample)
        try:
            prepared = prepare(rows, cfg.lookback, cfg.horizon, data.period_s, features=data.features,
                               targets=data.targets, fitted_scaler=data.scaler, **{k: v for k, v in options.items() if k != "scaler"})
        except ValueError as exc:
            print(f"train: the evaluation devices: {exc}", file=sys.stderr)
            return 2
        del rows
        info = {"parquet": str(args.data), "period_s": data.period_s,
                "stream": {"devices": data.totals["devices"], "ranks": d.world, "windows": data.totals["windows"],
                           "rows": data.totals["rows"], "eval_devices": sample if len(sample) <= 32 else len(sample),
                           "shuffle_buffer": args.shuffle_buffer, "train_windows_per_s": round(result.train_windows_per_s, 1)}}
        eval_rows = None
        if args.eval_data:
            from simulation.synth import read_csv

            eval_rows = read_csv(args.eval_data)
        import json

        schedule = json.loads(Path(args.eval_schedule).read_text()) if args.eval_schedule else []
        build_bundle(None, cfg, args.out, args.name, args.version, args.invocation, info, eval_rows, schedule,
                     features=data.features, targets=data.targets, trained=(prepared, result))
        print(f"rank 0/{d.world}: bundle written, peak RSS {peak_rss_mib():.0f} MiB", flush=True)
        return 0


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

