"""The benchmark's helper processes (`python -m agent.loadgen ROLE ...`), each run by `agent.tools.bench` in its own
process so that its CPU never counts against the daemon's:

- `publish`: the load generator. D devices x F features, slot-major (every device's slot s, then s + 1), healthy
  recorded pumps for the shipped model's features, at a set rate or as fast as paho can write; it records each message's publication time (wall clock) in a .npy
  file, the side channel the benchmark joins with forecast arrivals for latency.
- `receive`: the receive ceiling, a bare paho subscriber that only decodes the same JSON payloads.
- `naive`: the naive daemon, the model run once per message at batch 1 (no batching, no detection); with
  `--hold-ms`, the same daemon holding readings and batching them, as the real daemon does at a trickle.
- `infer`: the inference ceiling, onnxruntime alone on full batches (same session options as the daemon), the best
  of six rounds.

Each prints one JSON object on its last stdout line; `receive` and `naive` print READY once subscribed.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

DEVICE_FORMAT = "bench-{:05d}"
TOPIC_FORMAT = "sensors/{}/telemetry"
SENSOR_FILTER = "sensors/+/telemetry"


def _subscribe_to_sensors(client) -> None:
    """Subscribe to every sensor topic on (re)connect; print READY for the bench once the broker confirmed it."""

    def on_connect(client, userdata, flags, reason_code, properties):
        if not reason_code.is_failure:
            client.subscribe(SENSOR_FILTER, qos=1)

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        print("READY", flush=True)

    client.on_connect, client.on_subscribe = on_connect, on_subscribe


def device_name(i: int) -> str:
    return DEVICE_FORMAT.format(i)


def device_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


HEALTHY_PUMPS = Path(__file__).resolve().parent / "bench_pumps.npz"  # written by scripts/bench_trace.py
TRACE_SPAN = 2000  # slots a run can take from a device's start before its trace turns back


def _healthy_trace(features: list[str], period_s: float) -> np.ndarray | None:
    """The recorded healthy pumps (P, N, F) in `features`' order, or None when the model reads other features."""
    if not HEALTHY_PUMPS.exists():
        return None
    with np.load(HEALTHY_PUMPS) as data:
        if sorted(data["features"].tolist()) != sorted(features) or float(data["period_s"]) != period_s:
            return None
        order = [data["features"].tolist().index(f) for f in features]
        return data["values"][:, :, order].astype(np.float64)


def telemetry_payloads(features: list[str], offset: np.ndarray, scale: np.ndarray, devices: int, first_slot: int,
                       slots: int, period_s: float, seed: int = 0, origin: int | None = None) -> list[tuple[str, bytes]]:
    """Slot-major telemetry of healthy pumps: for the shipped model's features, each device replays one of the
    recorded healthy synthetic pumps (agent/bench_pumps.npz) from its own starting point (`origin`: the run's
    first slot), so the forecaster sees the pumps it was trained on and alerts stay rare, as on a real fleet.
    A run longer than TRACE_SPAN slots plays the trace back and forth. For other models: a smooth load cycle per
    device plus noise around the model's scaler (which such a model may well find anomalous)."""
    trace = _healthy_trace(features, period_s)
    if trace is None:
        rng = np.random.default_rng(seed + first_slot)
        s = np.arange(first_slot, first_slot + slots, dtype=np.float64)[:, None, None]  # (S, 1, 1)
        phase = np.arange(devices, dtype=np.float64)[None, :, None] / max(devices, 1)  # (1, D, 1)
        lag = np.arange(len(features), dtype=np.float64)[None, None, :] * 0.05  # (1, 1, F)
        cycle = 0.8 * np.sin(2 * np.pi * (s / 180.0 + phase - lag))  # (S, D, F) a 3-hour duty cycle
        noise = 0.05 * rng.standard_normal((slots, devices, len(features)))
        values = offset + scale * (cycle + noise)  # (S, D, F)
    else:
        pumps, length, _ = trace.shape
        start = (np.arange(devices) * 7919 + seed) % max(1, length - TRACE_SPAN)  # (D,) each device its own stretch
        step = np.arange(first_slot, first_slot + slots) - (first_slot if origin is None else origin)  # (S,)
        index = (start[None, :] + step[:, None]) % (2 * length - 2)  # (S, D) there and back, never a jump
        index = np.where(index < length, index, 2 * length - 2 - index)
        values = trace[np.arange(devices) % pumps, index]  # (S, D, F)
    topics = [TOPIC_FORMAT.format(device_name(d)) for d in range(devices)]
    template = '{"ts":%d,"values":{' + ",".join(f'"{name}":%.4f' for name in features) + "}}"
    out = []
    for k in range(slots):
        ts = int(round((first_slot + k) * period_s))
        rows = values[k].tolist()
        for d in range(devices):
            out.append((topics[d], (template % (ts, *rows[d])).encode()))
    return out


def _client(client_id: str):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    return paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311, clean_session=True)


def _manifest(model: str) -> dict:
    return json.loads((Path(model) / "manifest.json").read_text())


def _scaler(manifest: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    features = manifest["features"]
    params = manifest["scaler"]["params"]
    if manifest["scaler"]["type"] == "standard":
        offset = np.array([params[f]["mean"] for f in features])
        scale = np.array([params[f]["std"] for f in features])
    else:
        offset = np.array([params[f]["min"] for f in features])
        scale = np.array([params[f]["max"] - params[f]["min"] for f in features])
    return features, offset, scale


# -- publish ------------------------------------------------------------------------------------------------------


def publish(args: argparse.Namespace) -> dict:
    """Publish without paho's network thread: publish() then writes straight to the socket (one thread, so the
    generator's ceiling is what one Python core can write)."""
    import paho.mqtt.client as paho

    manifest = _manifest(args.model)
    features, offset, scale = _scaler(manifest)
    messages = telemetry_payloads(features, offset, scale, args.devices, args.first_slot, args.slots,
                                  float(manifest["sampling_period_s"]), args.seed, args.origin)
    client = _client(f"edgecast-loadgen-{args.first_slot}-{time.monotonic_ns()}")
    client.max_queued_messages_set(0)
    qos = getattr(args, "qos", 0)
    client.max_inflight_messages_set(0)  # QoS 1: no window of our own (0 = unlimited)
    client.connect("127.0.0.1", args.port, keepalive=120)
    while not client.is_connected():
        client.loop(0.05)
    # Each reading on the wire when it is published, as from sensors on connections of their own: with Nagle's
    # algorithm the kernel holds small packets back while one is unacknowledged, the daemon gets them in bursts (less
    # work per reading than a real fleet gives it), and the recorded publication times run ahead of the wire.
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = np.empty(len(messages), dtype=np.float64)
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    clock, wall, sleep = time.perf_counter, time.time, time.sleep
    started = clock()
    wall_offset = wall() - started  # one wall-clock reading; perf_counter is finer and monotonic
    for i, (topic, payload) in enumerate(messages):
        if interval:
            due = started + i * interval
            ahead = due - clock()
            if ahead > 0.0005:
                sleep(ahead)
        info = client.publish(topic, payload, qos=qos)
        times[i] = clock()
        if info.rc not in (paho.MQTT_ERR_SUCCESS,):
            raise SystemExit(f"publish failed: {paho.error_string(info.rc)}")
        if qos and (i & 63) == 0:
            client.loop_read(64)  # take the broker's PUBACKs as they come
        if (i & 1023) == 0:
            client.loop_misc()
    while client.want_write():  # whatever the socket did not take yet
        client.loop_write()
    deadline = clock() + 60.0
    while qos and not info.is_published() and clock() < deadline:  # every reading acknowledged by the broker
        client.loop(0.05)
    elapsed = clock() - started
    client.disconnect()
    if args.times:
        np.save(args.times, times + wall_offset)
    return {"published": len(messages), "seconds": elapsed, "rate": len(messages) / elapsed if elapsed > 0 else 0.0}


# -- receive ceiling ----------------------------------------------------------------------------------------------


def receive(args: argparse.Namespace) -> dict:
    """Decode every message's JSON and nothing else; exit after `--expect` messages."""
    client = _client(f"edgecast-receive-{time.monotonic_ns()}")
    done = threading.Event()
    state = {"n": 0, "first": 0.0, "last": 0.0, "values": 0, "cpu_first": 0.0, "cpu_last": 0.0}
    loads = json.loads

    def on_message(client, userdata, message):
        data = loads(message.payload)
        state["values"] += len(data["values"])
        n = state["n"] = state["n"] + 1
        if n == 1:
            state["first"], state["cpu_first"] = time.time(), time.process_time()
        if n >= args.expect:
            state["last"], state["cpu_last"] = time.time(), time.process_time()
            done.set()

    _subscribe_to_sensors(client)
    client.on_message = on_message
    client.connect("127.0.0.1", args.port, keepalive=120)
    client.loop_start()
    done.wait(args.timeout)
    client.loop_stop()
    cpu_per_message = (state["cpu_last"] - state["cpu_first"]) / max(state["n"] - 1, 1)
    return {"received": state["n"], "first": state["first"], "last": state["last"], "cpu_us_per_message": cpu_per_message * 1e6}


# -- naive daemon -------------------------------------------------------------------------------------------------


def naive(args: argparse.Namespace) -> dict:
    """The obvious daemon: per message decode, append to the device's window, scale, run the model at batch 1,
    publish the forecast. Same model, same onnxruntime options as the real one.

    With `--hold-ms`, the obvious daemon that batches: readings whose window is full are held on the one network
    thread until the first of them is that old (or `--max-batch` are held), then run through the model in one call.
    It does what the real daemon does at a trickle minus the detection and the contract's payload: the obvious
    alternative to compare ours with once batching is the answer."""
    import onnxruntime as ort

    manifest = _manifest(args.model)
    features, offset, scale = _scaler(manifest)
    targets = manifest["targets"]
    t_index = [features.index(t) for t in targets]
    lookback, horizon, period = manifest["lookback"], manifest["horizon"], float(manifest["sampling_period_s"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(Path(args.model) / manifest["onnx"]["file"]), options, providers=["CPUExecutionProvider"])
    windows: dict[str, deque] = {}
    stop = threading.Event()
    counts = {"messages": 0, "forecasts": 0, "calls": 0}
    hold_s = args.hold_ms / 1000.0
    held: list[tuple[str, float, np.ndarray]] = []  # (device, ts, window (L, F)) waiting for the model
    held_since = [0.0]

    def forecast(client, batch: list[tuple[str, float, np.ndarray]]) -> None:
        x = ((np.stack([w for _, _, w in batch]) - offset) / scale).astype(np.float32)  # (B, L, F)
        y = session.run(None, {"x": x})[0] * scale[t_index] + offset[t_index]  # (B, H, T)
        counts["calls"] += 1
        for (device, ts, _), values in zip(batch, y):
            body = {"device": device, "ts": ts, "horizon_ts": [ts + period * (k + 1) for k in range(horizon)],
                    "forecast": {t: [round(float(v), 4) for v in values[:, j]] for j, t in enumerate(targets)}}
            client.publish(f"edgecast/{device}/forecast", json.dumps(body), qos=0)
        counts["forecasts"] += len(batch)

    def on_message(client, userdata, message):
        device = message.topic.split("/")[1]
        data = json.loads(message.payload)
        row = [float(data["values"][f]) for f in features]
        window = windows.setdefault(device, deque(maxlen=lookback))
        window.append(row)
        counts["messages"] += 1
        if len(window) < lookback:
            return
        if not hold_s:
            forecast(client, [(device, float(data["ts"]), np.array(window, dtype=np.float64))])
            return
        if not held:
            held_since[0] = time.monotonic()
        held.append((device, float(data["ts"]), np.array(window, dtype=np.float64)))

    client = _client(f"edgecast-naive-{time.monotonic_ns()}")
    _subscribe_to_sensors(client)
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client.connect("127.0.0.1", args.port, keepalive=120)
    if not hold_s:
        client.loop_start()
        stop.wait()
        client.loop_stop()
        return counts
    # Holding: this thread reads, holds and runs the model, as the real daemon's network thread does at a trickle.
    while not stop.is_set():
        due = held_since[0] + hold_s - time.monotonic() if held else 1.0
        if due > 0 and len(held) < args.max_batch:
            client.loop(timeout=due)
        if held and (len(held) >= args.max_batch or time.monotonic() >= held_since[0] + hold_s):
            batch = held[: args.max_batch]
            del held[: args.max_batch]
            held_since[0] = time.monotonic()
            forecast(client, batch)
    client.disconnect()
    return counts


# -- inference ceiling ----------------------------------------------------------------------------------------------


def infer(args: argparse.Namespace) -> dict:
    """Windows per second of the model alone on full batches, through the daemon's own Bundle.predict."""
    from agent.core.model import load_bundle

    bundle = load_bundle(args.model, args.threads)
    rng = np.random.default_rng(0)
    x = (bundle.offset + bundle.scale * rng.standard_normal((args.batch, bundle.lookback, bundle.n_features))).astype(np.float32)
    for _ in range(3):
        bundle.predict(x)
    # The ceiling is the best of several rounds: on a machine where other work runs, a round that lost the core for a
    # while would otherwise lower the ceiling and flatter every ratio against it.
    windows, calls, best = 0, 0, 0.0
    round_s = args.seconds / 6
    started, cpu_started = time.perf_counter(), time.process_time()
    while time.perf_counter() - started < args.seconds:
        round_started, round_windows = time.perf_counter(), 0
        while time.perf_counter() - round_started < round_s:
            bundle.predict(x)
            round_windows += args.batch
            calls += 1
        best = max(best, round_windows / (time.perf_counter() - round_started))
        windows += round_windows
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"windows": windows, "calls": calls, "seconds": elapsed, "windows_per_s": best, "mean_windows_per_s": windows / elapsed,
            "batch": args.batch, "threads": args.threads, "cpu_us_per_window": cpu / windows * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.tools.loadgen", description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)
    p = roles.add_parser("publish")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--devices", type=int, required=True)
    p.add_argument("--first-slot", type=int, required=True)
    p.add_argument("--slots", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0, help="messages per second (0: as fast as possible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--origin", type=int, help="the run's first slot: devices replay their trace from there (default: --first-slot)")
    p.add_argument("--times", help="write each message's publication time (unix seconds) to this .npy file")
    p.add_argument("--qos", type=int, choices=(0, 1), default=0, help="QoS of the readings (1: acknowledged by the broker)")
    r = roles.add_parser("receive")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--expect", type=int, required=True)
    r.add_argument("--timeout", type=float, default=120.0)
    n = roles.add_parser("naive")
    n.add_argument("--port", type=int, required=True)
    n.add_argument("--model", required=True)
    n.add_argument("--threads", type=int, default=1)
    n.add_argument("--hold-ms", type=float, default=0.0, help="hold readings this long and run them in one model call (0: one call per message)")
    n.add_argument("--max-batch", type=int, default=64, help="with --hold-ms: at most this many windows per model call")
    i = roles.add_parser("infer")
    i.add_argument("--model", required=True)
    i.add_argument("--batch", type=int, default=64)
    i.add_argument("--threads", type=int, default=1)
    i.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    result = {"publish": publish, "receive": receive, "naive": naive, "infer": infer}[args.role](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
