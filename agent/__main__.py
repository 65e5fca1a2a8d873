"""Command line: `python -m agent run | check-config | replay | models verify | config-reference | schemas`
(also installed as `edgecast-agent`); the operator commands live in agent/tools/cli_ops.py.

Exit codes: 0 ok, 1 configuration, bundle or data errors (a clear message on stderr), 2 usage errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
SECRET_HINTS = ("password", "key", "secret", "token")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgecast-agent", description="edgecast edge agent: MQTT sensor streams -> forecasts and anomaly alerts.")
    parser.add_argument("--version", action="version", version=f"edgecast-agent {__version__} (python {sys.version.split()[0]})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    run.add_argument("--config", metavar="FILE", help="TOML configuration file (EDGECAST_* environment variables take precedence)")

    check = commands.add_parser("check-config", help="print the effective configuration (secrets masked) or its errors")
    check.add_argument("--config", metavar="FILE", help="TOML configuration file")
    check.add_argument("--no-model", action="store_true", help="do not load and verify the model bundle")

    replay = commands.add_parser("replay", help="run a historical CSV through the daemon's pipeline, no broker")
    replay.add_argument("--model", required=True, metavar="DIR|NAME", help="model bundle folder (model.onnx + manifest.json), or the name of a [[models]] entry of --config (its bundle and sections)")
    replay.add_argument("--data", required=True, metavar="FILE.csv", help="input CSV with a timestamp column and one column per model feature")
    replay.add_argument("--out", required=True, metavar="FILE.csv", help="output CSV, one row per input row")
    replay.add_argument("--ts-column", "--timestamp-column", dest="ts_column", metavar="NAME",
                        help="timestamp column (default: the first column named ts, timestamp, time, datetime or date, any case)")
    replay.add_argument("--ts-format", default="auto", help="auto (unix seconds or ISO-8601) | unix | unix_ms | iso | a strptime format such as '%%d/%%m/%%Y %%H:%%M' (naive times are UTC)")
    replay.add_argument("--device-column", default="device", help="device column; without it the file is one device (default: device)")
    replay.add_argument("--delimiter", default=",", help="CSV delimiter (default: ',')")
    replay.add_argument("--config", metavar="FILE", help="TOML configuration for window/detect/inference settings")
    replay.add_argument("--plot", metavar="FILE.png", help="also draw signals, forecasts, score, thresholds, alerts and labeled faults (needs matplotlib)")
    replay.add_argument("--plot-device", help="device to plot (default: the first in the file)")
    replay.add_argument("--label-column", default="label", help="0/1 fault labels to shade in the plot, if the column exists (default: label)")
    from agent.tools import cli_ops

    cli_ops.add_parsers(commands)
    from agent.tools import bench

    bench.add_parser(commands)
    cli_ops.add_examples(parser, commands)
    return parser


def _error(message: str) -> int:
    print(f"edgecast-agent: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _format_validation_error(error) -> str:
    lines = [f"invalid configuration ({error.error_count()} error{'s' if error.error_count() != 1 else ''}):"]
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        text = f"  {path}: {item['msg']}"
        secret = any(hint in path.lower() for hint in SECRET_HINTS)
        if "input" in item and not secret and not isinstance(item["input"], dict):
            text += f" (got {repr(item['input'])[:80]})"
        lines.append(text)
    return "\n".join(lines)


def _load_settings(config: str | None, **overrides):
    """(settings, None) or (None, exit code) after printing why the configuration is unusable."""
    from pydantic import ValidationError

    from agent.config.settings import UnknownEnvironmentVariable, load_settings

    try:
        return load_settings(config, **overrides), None
    except FileNotFoundError as exc:
        return None, _error(str(exc))
    except UnknownEnvironmentVariable as exc:
        return None, _error(str(exc))
    except ValidationError as exc:
        return None, _error(_format_validation_error(exc))
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML
        return None, _error(f"cannot read configuration {config}: {exc}")


def _load_checked(config: str | None):
    """(settings, None) when they validate and pass every check `run` makes before connecting (agent/ops/preflight.py),
    or (None, exit code) after printing why not, each problem naming its setting."""
    from agent.ops import preflight

    settings, code = _load_settings(config)
    if settings is None:
        return None, code
    problems = preflight.problems(settings)
    if problems:
        return None, _error(preflight.describe(problems))
    return settings, None


def cmd_run(args: argparse.Namespace) -> int:
    from agent.config.snapshot import load_in_child

    # Validated (and checked as check-config checks it) in a forked child: the daemon runs on a plain snapshot
    # and never imports pydantic (~14 MiB).
    settings, code = load_in_child(lambda: _load_checked(args.config))
    if settings is None:
        return code
    from agent.app import run_daemon  # imported late: paho and the daemon are not needed by the other commands
    from agent.core.model import BundleError

    try:
        return run_daemon(settings)
    except BundleError as exc:
        return _error(f"model bundle {settings.model.path} refused: {exc}")


def cmd_check_config(args: argparse.Namespace) -> int:
    """The effective configuration, then every check `run` makes before connecting (the same function), then the
    model bundle (unless --no-model); exit 1 naming each problem's setting."""
    from agent.ops import preflight
    from agent.config.settings import masked_dump

    settings, code = _load_settings(args.config)
    if settings is None:
        return code
    print(json.dumps(masked_dump(settings), indent=2, sort_keys=False))
    problems = preflight.problems(settings)
    if problems:
        return _error(preflight.describe(problems))
    if args.no_model:
        return EXIT_OK
    from agent.config.models import model_plans
    from agent.core.model import BundleError, load_configured_bundle

    for plan in model_plans(settings):
        where = "" if plan.single else f"model {plan.name}: "
        try:
            bundle = load_configured_bundle(plan.settings.model)  # checksum, signature (when configured), shapes, warm-up
        except BundleError as exc:
            return _error(f"{where}model bundle {plan.settings.model.path} refused: {exc}")
        print(f"{where}model bundle OK: {bundle.name} {bundle.version} ({bundle.path}, sha256 {bundle.sha256[:12]}...)", file=sys.stderr)
    return EXIT_OK


def _replay_settings(args: argparse.Namespace):
    """(settings, None) for the bundle to replay: `--model DIR`, or `--model NAME` of the configuration's [[models]]
    (that model's bundle and its own [window], [detect] and [inference] sections, as the daemon runs it)."""
    from agent.config.models import model_plans

    if Path(args.model).is_dir() or args.config is None:
        return _load_settings(args.config, model={"path": Path(args.model)})
    settings, code = _load_settings(args.config)
    if settings is None:
        return None, code
    plans = {plan.name: plan for plan in model_plans(settings) if not plan.single or settings.models}
    if args.model not in plans:
        return None, _error(f"--model {args.model!r} is neither a bundle folder nor a model of {args.config} "
                            f"(its [[models]]: {sorted(plans) or 'none'})")
    return plans[args.model].settings, None


def cmd_replay(args: argparse.Namespace) -> int:
    from agent.core.model import BundleError
    from agent.tools.replay import ReplayError, print_summary, replay

    if args.delimiter in ("\\t", "tab"):
        args.delimiter = "\t"
    if len(args.delimiter) != 1:
        return _error(f"--delimiter must be one character (or 'tab'), got {args.delimiter!r}")
    if not Path(args.data).is_file():
        return _error(f"data file not found: {args.data}")
    settings, code = _replay_settings(args)
    if settings is None:
        return code
    try:
        result = replay(
            settings.model.path,
            args.data,
            args.out,
            settings=settings,
            ts_column=args.ts_column,
            device_column=args.device_column,
            delimiter=args.delimiter,
            ts_format=args.ts_format,
            plot_path=args.plot,
            plot_device=args.plot_device,
            label_column=args.label_column,
        )
    except BundleError as exc:
        return _error(f"model bundle {args.model} refused: {exc}")
    except ReplayError as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(str(exc))
    print_summary(result, args.out)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # exits 2 on usage errors
    from agent.tools import cli_ops

    handlers = {
        "run": cmd_run, "check-config": cmd_check_config, "replay": cmd_replay,
        "models": lambda a: cli_ops.cmd_models(a, _load_settings),
        "export-feedback": lambda a: cli_ops.cmd_export_feedback(a, _load_settings),
        "config-reference": cli_ops.cmd_config_reference, "schemas": cli_ops.cmd_schemas,
        "bench": lambda a: __import__("agent.tools.bench", fromlist=["cmd_bench"]).cmd_bench(a),
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
