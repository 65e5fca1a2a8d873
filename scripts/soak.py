#!/usr/bin/env python3
"""Soak: the daemon at a steady load against a private mosquitto, resident memory sampled throughout.

    .venv/bin/python scripts/soak.py --minutes 10 [--devices 100 --rate 100 --durable-forecasts]

Starts mosquitto (its own config, a free port) and `python -m agent run` (shipped model, outbox in a temp
state directory), publishes synthetic-fleet telemetry (with faults, so alerts flow too) at `--rate` messages
per second, and reads VmRSS of the daemon every `--sample-s` seconds. Prints RSS after the warm-up and at the
end, the growth between them, and what flowed (published, forecasts and alerts received, daemon counters from
its log). Exit 1 when the growth exceeds --max-growth-mib.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--rate", type=float, default=100.0, help="telemetry messages per second")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--durable-forecasts", action="store_true", help="forecasts through the outbox too (QoS 1)")
    parser.add_argument("--max-growth-mib", type=float, default=8.0)
    parser.add_argument("--mosquitto", default="/usr/sbin/mosquitto")
    args = parser.parse_args()

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from simulation.synth import FleetConfig, generate_fleet

    work = Path(tempfile.mkdtemp(prefix="edgecast-soak-"))
    port = free_port()
    conf = work / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n{user}persistence false\nmax_queued_messages 100000\n")
    broker = subprocess.Popen([args.mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    duration_s = args.minutes * 60
    per_device = int(duration_s * args.rate / args.devices) + 10
    # Timestamps one sampling period apart, ending near now (the agent refuses far past and future ones).
    fleet = generate_fleet(FleetConfig(devices=args.devices, hours=per_device / 60.0, seed=7, period_s=60,
                                       start_ts=int(time.time()) // 60 * 60 - per_device * 60, faults="auto",
                                       dropout_rate=0.0, dropout_burst_rate=0.0))
    r = fleet.rows
    features = ["bearing_temp", "vibration_rms", "motor_current", "outlet_pressure"]
    messages = [
        (f"sensors/{r['device'][i]}/telemetry",
         ('{"ts":%d,"values":{%s}}' % (int(r["ts"][i]), ",".join(f'"{f}":{float(r[f][i]):.4f}' for f in features))).encode())
        for i in range(len(r["ts"]))
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECAST_")}
    env.update(EDGECAST_MQTT__PORT=str(port), EDGECAST_AGENT_ID="soak", EDGECAST_STATE__DIRECTORY=str(work / "state"),
               EDGECAST_OUTBOX__FORECASTS="true" if args.durable_forecasts else "false", PYTHONUNBUFFERED="1")
    log_path = work / "agent.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "agent", "run"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    received = {"forecast": 0, "alert": 0}
    online = threading.Event()

    def on_message(client, userdata, message):
        kind = message.topic.rsplit("/", 1)[-1]
        if kind in received:
            received[kind] += 1
        elif message.topic.endswith("/status") and b'"online"' in message.payload:
            online.set()

    sub = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="soak-sub")
    sub.on_message = on_message
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe([("edgecast/+/forecast", 0), ("edgecast/+/alert", 1), ("edgecast/agent/+/status", 1)])
    pub = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="soak-pub")
    pub.max_inflight_messages_set(200)
    for client in (sub, pub):
        client.connect_async("127.0.0.1", port)
        client.loop_start()
    samples: list[tuple[float, int]] = []
    pace = threading.Event()
    try:
        if not online.wait(60):
            print(f"the daemon did not come online:\n{log_path.read_text()}", file=sys.stderr)
            return 1
        start = time.monotonic()
        next_sample = start
        sent = 0
        while (elapsed := time.monotonic() - start) < duration_s and sent < len(messages):
            due = min(len(messages), int(elapsed * args.rate) + 1)
            while sent < due:
                topic, payload = messages[sent]
                pub.publish(topic, payload, qos=1)
                sent += 1
            if time.monotonic() >= next_sample:
                samples.append((time.monotonic() - start, rss_kib(daemon.pid)))
                next_sample += args.sample_s
            pace.wait(0.01)
        samples.append((time.monotonic() - start, rss_kib(daemon.pid)))
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
        broker.terminate()
        for client in (sub, pub):
            client.loop_stop()

    warm = [kib for t, kib in samples if t >= args.warmup_minutes * 60]
    after_warmup, at_end = warm[0], samples[-1][1]
    growth_mib = (at_end - after_warmup) / 1024
    print(f"soak: {args.minutes:g} min, {args.devices} devices, {args.rate:g} msg/s, durable forecasts: {args.durable_forecasts}")
    print(f"published {sent} telemetry messages; received {received['forecast']} forecasts, {received['alert']} alert events")
    print(f"RSS samples (every {args.sample_s:g}s, n={len(samples)}): min {min(k for _, k in samples) / 1024:.1f} MiB, "
          f"max {max(k for _, k in samples) / 1024:.1f} MiB")
    print(f"RSS after warm-up ({args.warmup_minutes:g} min): {after_warmup / 1024:.1f} MiB; at the end: {at_end / 1024:.1f} MiB; "
          f"growth {growth_mib:+.2f} MiB")
    for line in log_path.read_text().splitlines():
        if "stopped:" in line:
            print("daemon:", line.split("stopped:", 1)[1].strip())
    print(f"work dir: {work}")
    return 0 if growth_mib <= args.max_growth_mib else 1


if __name__ == "__main__":
    sys.exit(main())
