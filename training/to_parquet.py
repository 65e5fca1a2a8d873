"""`python -m training to-parquet`: fleet CSVs (or Parquet files) -> a partitioned Parquet dataset for streaming
training (`train --data FOLDER`, training.stream).

The files are read in blocks (pyarrow's streaming CSV reader), so memory follows a block and the rows buffered per
partition before a row group is written, not the file. Output: `OUT/device=NAME/part-*.parquet` (one folder per
device, the default) or `OUT/day=YYYY-MM-DD/part-*.parquet`, with columns ts (int64 unix seconds), device, the
features (float32 unless --dtype float64) and label (when the input has one).

`--synthetic-devices N --synthetic-days D` writes the synthetic pump fleet of `synth` straight into the dataset,
one device at a time (the same rows as `synth --out` for the same seed, without a fleet-sized CSV in between).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

PARTITIONS = ("device", "day")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", help="CSV or Parquet file(s), all with the same columns")
    parser.add_argument("--out", required=True, help="dataset folder to write (replaced as a whole)")
    parser.add_argument("--partition", choices=PARTITIONS, default="device",
                        help="one folder per device (default: each rank reads only its own devices' folders) or per day")
    parser.add_argument("--ts-column", "--timestamp-column", dest="ts_column", metavar="NAME",
                        help="timestamp column (default: the first column named ts, timestamp, time, datetime or date)")
    parser.add_argument("--device-column", default="device", help="absent column = one device named 'series'")
    parser.add_argument("--features", help="comma-separated features to keep (default: every numeric column)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="feature type on disk")
    parser.add_argument("--block-rows", type=int, default=1_000_000, help="rows read at a time (memory)")
    parser.add_argument("--row-group-rows", type=int, default=4096,
                        help="rows buffered per partition before a row group is written (memory: partitions x this)")
    g = parser.add_argument_group("synthetic fleet instead of --data")
    g.add_argument("--synthetic-devices", type=int, help="pumps of the synthetic fleet (simulation.synth), written device by device")
    g.add_argument("--synthetic-days", type=float, default=30.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--faults", default="auto", help="auto | none | fault specs as in `synth --faults`")


def _blocks(path: Path, block_rows: int, device_column: str | None = "device"):
    """Record batches of one file, read a block at a time."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if path.suffix.lower() in (".parquet", ".pq"):
        yield from pq.ParquetFile(path).iter_batches(batch_size=block_rows)
        return
    # ~100 bytes a CSV row: the block size in bytes that holds about block_rows rows
    options = pcsv.ReadOptions(block_size=max(1 << 20, min(block_rows * 100, (1 << 31) - 1)))
    convert = pcsv.ConvertOptions(strings_can_be_null=True, column_types={c: pa.string() for c in (device_column, "fault") if c})
    with pcsv.open_csv(path, read_options=options, convert_options=convert) as reader:
        for batch in reader:
            yield batch


def _convert(batch, source: str, ts_column: str | None, device_column: str | None, features: list[str] | None,
             dtype: str, partition: str):
    """One input block -> the dataset's columns (training.data.rows_from_frame parses it: the same rules)."""
    import pyarrow as pa

    from training.data import rows_from_frame

    frame = batch.to_pandas()
    has_label = "label" in frame.columns
    rows, features = rows_from_frame(frame, source, ts_column, device_column, features)
    columns = {"ts": pa.array(rows["ts"], pa.int64()), "device": pa.array(rows["device"].astype(str), pa.string())}
    for f in features:
        columns[f] = pa.array(rows[f].astype(dtype))
    if has_label:
        columns["label"] = pa.array(rows["label"].astype(np.int8))
    if partition == "day":
        columns["day"] = pa.array(np.datetime_as_string(rows["ts"].astype("datetime64[s]"), unit="D"))
    return pa.table(columns), features


def convert(paths: list[str | Path], out: str | Path, partition: str = "device", ts_column: str | None = None,
            device_column: str | None = "device", features: list[str] | None = None, dtype: str = "float32",
            block_rows: int = 1_000_000, row_group_rows: int = 4096, log=print) -> dict:
    """Write the files' rows as a hive-partitioned dataset; return {"rows", "devices", "files"}."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    devices: set[str] = set()
    counted = {"rows": 0}
    schema_holder: list = []

    def tables():
        nonlocal features
        for path in paths:
            path = Path(path)
            if not path.exists():
                raise ValueError(f"{path}: no such file")
            for batch in _blocks(path, block_rows, device_column):
                table, features = _convert(batch, str(path), ts_column, device_column, features, dtype, partition)
                if schema_holder and table.schema != schema_holder[0]:
                    table = table.cast(schema_holder[0])
                counted["rows"] += table.num_rows
                devices.update(table.column("device").unique().to_pylist())
                yield from table.to_batches()

    batches = tables()
    first = next(batches, None)
    if first is None:
        raise ValueError("no rows in the input")
    schema_holder.append(first.schema)

    def chained():
        yield first
        yield from batches

    ds.write_dataset(pa.RecordBatchReader.from_batches(first.schema, chained()), str(out), format="parquet",
                     partitioning=ds.partitioning(pa.schema([(partition, pa.string())]), flavor="hive"),
                     basename_template="part-{i}.parquet", existing_data_behavior="overwrite_or_ignore",
                     min_rows_per_group=row_group_rows, max_rows_per_group=max(row_group_rows, 1 << 20),
                     max_open_files=max(1024, 2 * len(devices) + 16))
    files = len(list(out.rglob("*.parquet")))
    return {"rows": counted["rows"], "devices": len(devices), "files": files}


def synthetic(out: str | Path, devices: int, days: float, seed: int = 0, faults: str = "auto",
              dtype: str = "float32", log=print) -> dict:
    """The synthetic fleet of simulation.synth.generate_fleet, simulated and written one device at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from simulation.synth import FEATURES, FleetConfig, _auto_faults, _simulate_device, device_name, parse_fault_specs

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    cfg = FleetConfig(devices=devices, hours=days * 24.0, seed=seed, faults=parse_fault_specs(faults))
    n = int(cfg.hours * 3600.0 // cfg.period_s)
    specs = _auto_faults(cfg) if cfg.faults == "auto" else ([] if cfg.faults == "none" else list(cfg.faults))
    t_abs = cfg.start_ts + np.arange(n, dtype=np.float64) * cfg.period_s
    rows = 0
    began = time.perf_counter()
    for index in range(devices):
        name = device_name(index)
        values, label, _, observed = _simulate_device(cfg, index, t_abs, [s for s in specs if s.device == name])
        idx = np.flatnonzero(observed)
        columns = {"ts": pa.array((cfg.start_ts + idx * cfg.period_s).astype(np.int64)), "device": pa.array([name] * len(idx))}
        for j, feature in enumerate(FEATURES):
            columns[feature] = pa.array(np.round(values[observed][:, j], 4).astype(dtype))
        columns["label"] = pa.array(label[observed].astype(np.int8))
        folder = out / f"device={name}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table(columns).drop(["device"]), folder / "part-0.parquet", row_group_size=1 << 16)
        rows += len(idx)
        if (index + 1) % 100 == 0:
            log(f"to-parquet: {index + 1}/{devices} devices, {rows} rows ({time.perf_counter() - began:.0f} s)")
    return {"rows": rows, "devices": devices, "files": devices}


def run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    try:
        if args.synthetic_devices:
            if args.partition != "device":
                raise ValueError("--synthetic-devices writes one folder per device (--partition device)")
            result = synthetic(args.out, args.synthetic_devices, args.synthetic_days, args.seed, args.faults, args.dtype)
        elif args.data:
            features = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else None
            result = convert(args.data, args.out, args.partition, args.ts_column, args.device_column, features,
                             args.dtype, args.block_rows, args.row_group_rows)
        else:
            raise ValueError("give --data FILE [FILE ...] or --synthetic-devices N")
    except (OSError, ValueError) as exc:
        print(f"to-parquet: {exc}", file=sys.stderr)
        return 2
    print(f"to-parquet: wrote {result['rows']} rows of {result['devices']} devices in {result['files']} file(s) "
          f"to {args.out} ({time.perf_counter() - began:.0f} s)")
    return 0
