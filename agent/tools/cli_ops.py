"""Operator commands of `edgecast-agent`: `models verify DIR`, `config-reference`, `schemas`, and the --help examples.

Kept apart from agent/__main__.py (which holds run / check-config / replay) so each command stays short.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXAMPLES = {
    None: """examples:
  edgecast-agent run --config /etc/edgecast/agent.toml
  EDGECAST_MQTT__HOST=broker.local edgecast-agent run
  edgecast-agent check-config --config agent.toml
  edgecast-agent models verify exported_models/pump-lstm
  edgecast-agent replay --model exported_models/pump-lstm --data fleet.csv --out scored.csv
  edgecast-agent config-reference > docs/configuration.md

exit codes: 0 ok, 1 configuration, bundle or data error (the message says which), 2 usage error.
docs: README.md, docs/configuration.md, docs/contracts.md, docs/fleet.md""",
    "run": """examples:
  edgecast-agent run --config /etc/edgecast/agent.toml
  EDGECAST_MQTT__HOST=broker.local EDGECAST_METRICS__ENABLED=true edgecast-agent run
  kill -HUP <pid>          # reload the model bundle (systemctl reload edgecast-agent)

The daemon stops on SIGTERM/SIGINT after publishing what it accepted; exit 1 when it cannot start.""",
    "check-config": """examples:
  edgecast-agent check-config --config agent.toml            # effective settings + model bundle check
  EDGECAST_MQTT__PORT=99999 edgecast-agent check-config      # shows the error with its path (mqtt.port)

Runs every check `run` makes before connecting (secret and TLS files, password without TLS, model_cpu, ...).
exit codes: 0 valid (and the bundle verified), 1 invalid or refused (every problem listed with its setting path).""",
    "replay": """examples:
  edgecast-agent replay --model exported_models/pump-lstm --data fleet.csv --out scored.csv
  edgecast-agent replay --model DIR --data plant.csv --out out.csv --ts-column time --ts-format iso --device-column machine""",
    "models": """examples:
  edgecast-agent models verify exported_models/pump-lstm
  edgecast-agent models verify /var/lib/edgecast/models/pump-lstm-1.1.0-0123abcd --public-key-file model-signing.pub --require-signature
  edgecast-agent models verify DIR --config /etc/edgecast/agent.toml --json""",
    "config-reference": """example:
  edgecast-agent config-reference > docs/configuration.md""",
    "schemas": """examples:
  edgecast-agent schemas                      # list the JSON Schema files of every payload
  edgecast-agent schemas alert                # print one""",
}


def add_examples(parser: argparse.ArgumentParser, commands: argparse._SubParsersAction) -> None:
    """Attach the examples above as epilogs (raw text, so the line breaks stay)."""
    parser.epilog = EXAMPLES[None]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for name, sub in commands.choices.items():
        if name in EXAMPLES:
            sub.epilog = EXAMPLES[name]
            sub.formatter_class = argparse.RawDescriptionHelpFormatter


def add_parsers(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser("models", help="inspect model bundles (models verify DIR)")
    models_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    verify = models_commands.add_parser(
        "verify", help="check a bundle as the daemon would: checksum, signature, shapes, a warm-up run",
        description="Load a bundle exactly as the daemon does (manifest, model.onnx sha256, ed25519 signature when a key "
        "is given, input/output shapes, scaler, calibration, a finite warm-up run at two batch sizes) and report it.",
        epilog="exit codes: 0 the bundle verifies, 1 it is refused (the message names the failing check), 2 usage error.\n\n"
        + EXAMPLES["models"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("bundle", metavar="DIR", type=Path, nargs="?", help="bundle folder (model.onnx + manifest.json); "
                        "without it, every model of --config (or the one --model names)")
    verify.add_argument("--config", metavar="FILE", help="take model.public_key / public_key_file / require_signature from this configuration")
    verify.add_argument("--model", metavar="NAME", help="with --config and no DIR: only this [[models]] entry")
    verify.add_argument("--public-key", metavar="HEX", help="ed25519 public key (64 hex digits) the signature must verify with")
    verify.add_argument("--public-key-file", metavar="FILE", type=Path, help="file holding that public key (e.g. KEY.pub from `python -m training keygen`)")
    verify.add_argument("--require-signature", action="store_true", help="refuse an unsigned bundle (needs a key)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")

    feedback = commands.add_parser(
        "export-feedback", help="write the operators' feedback on alerts as labelled time ranges (CSV) for retraining",
        description="The feedback operators gave on alerts (docs/operators.md), from the agent's state directory, as the CSV "
        "that `training fit|train|evaluate-alerts --labels` read: device, start, end, label, alert_id, by, at, comment.",
    )
    feedback.add_argument("--state", metavar="DIR", type=Path, help="the agent's state directory (default: state.directory of --config)")
    feedback.add_argument("--config", metavar="FILE", help="configuration to take state.directory from")
    feedback.add_argument("--out", metavar="FILE.csv", type=Path, required=True)

    commands.add_parser("config-reference", help="print the configuration reference (Markdown) generated from the settings model")

    schemas = commands.add_parser("schemas", help="list or print the JSON Schemas of the payloads the agent reads and publishes")
    schemas.add_argument("name", nargs="?", help="schema to print (e.g. forecast, alert, status)")


def _error(message: str) -> int:
    print(f"edgecast-agent: error: {message}", file=sys.stderr)
    return 1


def _key_settings(args: argparse.Namespace):
    """(public key bytes or None, require_signature) from the flags or the configuration's [model] section."""
    from agent.core.signing import SignatureError, parse_hex

    if args.public_key and args.public_key_file:
        raise ValueError("give --public-key or --public-key-file, not both")
    if args.public_key or args.public_key_file:
        text = args.public_key or args.public_key_file.read_text(encoding="utf-8")
        try:
            return parse_hex(text, 32, "the public key"), args.require_signature
        except SignatureError as exc:
            raise ValueError(str(exc)) from None
    if args.config:
        return None, None  # resolved from the configuration by the caller
    if args.require_signature:
        raise ValueError("--require-signature needs --public-key, --public-key-file or --config with model.public_key")
    return None, False


def cmd_models(args: argparse.Namespace, load_settings) -> int:
    try:
        key, required = _key_settings(args)
    except (OSError, ValueError) as exc:
        return _error(str(exc))
    if args.bundle is None:
        return _verify_configured(args, load_settings)
    if args.model is not None:
        return _error("--model names a model of --config; give it without DIR")
    if required is None:  # from --config
        settings, code = load_settings(args.config)
        if settings is None:
            return code
        try:
            key = settings.model.resolved_public_keys() or None  # any trusted key may sign, as in the daemon
        except (OSError, ValueError) as exc:
            return _error(f"cannot read the model public key: {exc}")
        required = settings.model.require_signature or args.require_signature
    return _verify(args, args.bundle, key, bool(required))


def _verify_configured(args: argparse.Namespace, load_settings) -> int:
    """Every model of the configuration (or the one --model names), each with its own keys and signature rule."""
    from agent.config.models import model_plans

    if args.config is None:
        _error("give a bundle folder DIR, or --config FILE to verify the models it configures")
        return 2  # a usage error, as argparse's
    settings, code = load_settings(args.config)
    if settings is None:
        return code
    plans = model_plans(settings)
    if args.model is not None:
        plans = [plan for plan in plans if plan.name == args.model]
        if not plans:
            return _error(f"no model {args.model!r} in {args.config} (models: {[p.name for p in model_plans(settings)]})")
    worst = 0
    for plan in plans:
        model = plan.settings.model
        try:
            key = model.resolved_public_keys() or None
        except (OSError, ValueError) as exc:
            return _error(f"model {plan.name}: cannot read the model public key: {exc}")
        if not args.json:
            print(f"model {plan.name}:")
        worst = max(worst, _verify(args, Path(model.path), key, model.require_signature or args.require_signature, plan.name))
    return worst


def _verify(args: argparse.Namespace, folder: Path, key, required: bool, model_name: str | None = None) -> int:
    from agent.core.model import BundleError, load_bundle

    started = time.perf_counter()
    try:
        bundle = load_bundle(folder, public_key=key, require_signature=bool(required))
    except BundleError as exc:
        if args.json:
            print(json.dumps({"bundle": str(folder), "ok": False, "error": str(exc)}))
        return _error(f"model bundle {folder} refused: {exc}")
    load_s = time.perf_counter() - started
    latency = {}
    import numpy as np

    for batch in (1, 64):
        x = np.broadcast_to(bundle.offset.astype(np.float32), (batch, bundle.lookback, bundle.n_features)).copy()  # (B, L, F)
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            bundle.predict(x)
            runs.append(time.perf_counter() - t0)
        latency[f"batch_{batch}_ms"] = round(1000 * sorted(runs)[len(runs) // 2], 3)
    if key is None:
        signature = "not checked (no public key given)"
    elif bundle.signed:
        signer = getattr(bundle, "signed_by", None) or (key if isinstance(key, bytes) else key[0])
        signature = f"verified (ed25519, key {signer.hex()[:16] if isinstance(signer, bytes) else str(signer)[:16]}...)"
    else:
        signature = "absent (allowed: --require-signature not set)"
    manifest = bundle.manifest
    report = {
        "bundle": str(folder),
        **({"model": model_name} if model_name is not None else {}),
        "ok": True,
        "name": bundle.name,
        "version": bundle.version,
        "sha256": bundle.sha256,
        "signature": signature,
        "features": bundle.features,
        "targets": bundle.targets,
        "lookback": bundle.lookback,
        "horizon": bundle.horizon,
        "sampling_period_s": bundle.period_s,
        "input": f"{bundle.input_name} [batch, {bundle.lookback}, {bundle.n_features}]",
        "output": f"{bundle.output_name} [batch, {bundle.horizon}, {bundle.n_targets}]",
        "opset": manifest.get("onnx", {}).get("opset"),
        "thresholds": manifest["calibration"]["thresholds"],
        "load_and_verify_s": round(load_s, 3),
        "median_latency": latency,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"bundle {folder}: OK")
    print(f"  model       {bundle.name} {bundle.version}")
    print(f"  checksum    sha256 {bundle.sha256} matches the manifest")
    print(f"  signature   {signature}")
    print(f"  shapes      input {report['input']}, output {report['output']} (opset {report['opset']})")
    print(f"  features    {', '.join(bundle.features)}; targets {', '.join(bundle.targets)}; period {bundle.period_s:g}s")
    print(f"  warm-up     finite outputs at batch 1 and 3; median latency {latency['batch_1_ms']} ms (batch 1), {latency['batch_64_ms']} ms (batch 64)")
    print(f"  thresholds  {report['thresholds']}")
    return 0


def cmd_export_feedback(args: argparse.Namespace, load_settings) -> int:
    import csv

    from agent.core.alarms import ALARMS_FILE, feedback_rows

    state = args.state
    if state is None:
        settings, code = load_settings(args.config)
        if settings is None:
            return code
        state = Path(settings.state.directory)
    book = state / ALARMS_FILE
    if not book.is_file():
        return _error(f"no operator state in {state} ({ALARMS_FILE} not found): no feedback was given there")
    try:
        rows = feedback_rows(book, time.time())
    except (OSError, ValueError, KeyError) as exc:
        return _error(f"{book} is unreadable: {exc}")
    with open(args.out, "w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=["device", "start", "end", "label", "alert_id", "by", "at", "comment"])
        writer.writeheader()
        writer.writerows(rows)
    counts = {label: sum(1 for r in rows if r["label"] == label) for label in ("true_fault", "false_alarm", "unknown")}
    print(f"{len(rows)} labelled alert(s) -> {args.out} ({', '.join(f'{v} {k}' for k, v in counts.items())})", file=sys.stderr)
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from agent.config.reference import generate

    sys.stdout.write(generate())
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from agent.schemas import list_schemas, load_schema

    if args.name is None:
        for name, title in list_schemas():
            print(f"{name:22s} {title}")
        return 0
    try:
        print(json.dumps(load_schema(args.name), indent=2))
    except KeyError:
        return _error(f"no schema {args.name!r}; known: {', '.join(n for n, _ in list_schemas())}")
    return 0
