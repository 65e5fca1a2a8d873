"""`python -m training <command>` (also `edgecast-train`).

Each command is one line in COMMANDS: name -> (help, add_arguments(parser), run(args) -> exit code).
Torch is imported only inside the run functions that need it, so `synth` works without the training extra.
"""

from __future__ import annotations

import argparse
from importlib import import_module
import shlex
import sys


def _synth_args(parser: argparse.ArgumentParser) -> None:
    from simulation import synth

    synth.add_arguments(parser)


def _synth_run(args: argparse.Namespace) -> int:
    from simulation import synth

    return synth.run(args)


def _train_args(parser: argparse.ArgumentParser) -> None:
    from training import cli

    cli.add_train_arguments(parser)


def _train_run(args: argparse.Namespace) -> int:
    from training import cli

    return cli.run_train(args)


def _build_shipped_args(parser: argparse.ArgumentParser) -> None:
    from training import cli

    cli.add_build_shipped_arguments(parser)


def _build_shipped_run(args: argparse.Namespace) -> int:
    from training import cli

    return cli.run_build_shipped(args)


COMMANDS = {
    "synth": ("generate a synthetic pump or fan fleet (CSV and/or MQTT; --machine)", _synth_args, _synth_run),
    "train": ("train, export and calibrate a bundle from a fleet CSV", _train_args, _train_run),
    "build-shipped": ("regenerate exported_models/pump-lstm (--machine fan: fan-lstm) from a fixed-seed synthetic fleet", _build_shipped_args, _build_shipped_run),
    "fit": ("train on the first N rows (or a time range) of any CSV and export a bundle", lambda p: import_module("training.fit").add_arguments(p), lambda a: import_module("training.fit").run(a)),
    "evaluate-alerts": ("point-wise and event-level alert metrics of a replay against labels", lambda p: import_module("training.evaluate_alerts").add_arguments(p), lambda a: import_module("training.evaluate_alerts").run(a)),
    "detection-benchmark": ("held-out synthetic fleet -> replay -> evaluate-alerts, one table", lambda p: import_module("training.detection_benchmark").add_arguments(p), lambda a: import_module("training.detection_benchmark").run(a)),
    "recalibrate": ("recompute a bundle's anomaly calibration with the current detection code (model unchanged)", lambda p: import_module("training.calibrate").add_recalibrate_arguments(p), lambda a: import_module("training.calibrate").run_recalibrate(a)),
    "broker": ("run the embedded MQTT 3.1.1 broker, amqtt (for machines without mosquitto; the demo extra)", lambda p: import_module("simulation.broker").add_arguments(p), lambda a: import_module("simulation.broker").run(a)),
    "keygen": ("create an ed25519 key pair for signing model bundles", lambda p: import_module("training.sign").add_keygen_arguments(p), lambda a: import_module("training.sign").run_keygen(a)),
    "publish-model": ("publish a signed bundle to a model-update topic: agents with rollout enabled verify and swap it in", lambda p: import_module("training.publish_model").add_arguments(p), lambda a: import_module("training.publish_model").run(a)),
    "sign-model": ("sign a bundle's manifest.json as a new release (--release, --expires; manifest.json.sig) for agents with model.public_key", lambda p: import_module("training.sign").add_sign_arguments(p), lambda a: import_module("training.sign").run_sign(a)),
    "demo": ("the one-command demo: simulator -> broker -> edge daemon -> live view and summary", lambda p: import_module("simulation.demo").add_arguments(p), lambda a: import_module("simulation.demo").run(a)),
    # the training toolbox (issue 3)
    "search": ("Optuna hyperparameter search (random, TPE, grid); several workers share a study via --storage", lambda p: import_module("training.search").add_arguments(p), lambda a: import_module("training.search").run(a)),
    "data-report": ("resample a CSV/Parquet file, report its gaps and windows per split", lambda p: import_module("training.cli").add_data_report_arguments(p), lambda a: import_module("training.cli").run_data_report(a)),
    "compare": ("every architecture x strategy: validation/test metrics vs baselines, time per epoch", lambda p: import_module("training.compare").add_arguments(p), lambda a: import_module("training.compare").run(a)),
    "cv": ("time-series cross-validation (expanding or sliding training windows)", lambda p: import_module("training.cli").add_cv_arguments(p), lambda a: import_module("training.cli").run_cv(a)),
    "ensemble": ("train several forecasters and export their average as one bundle", lambda p: import_module("training.ensemble").add_arguments(p), lambda a: import_module("training.ensemble").run(a)),
    "transfer": ("fine-tune a shipped bundle on a little data from a new machine; gain over training from scratch", lambda p: import_module("training.transfer").add_arguments(p), lambda a: import_module("training.transfer").run(a)),
    "benchmark": ("public benchmarks: `benchmark ett` trains, exports and scores the ETTh1 horizons vs NLinear", lambda p: import_module("training.ett").add_arguments(p), lambda a: import_module("training.ett").run(a)),
    "speed": ("training throughput (windows/s) and peak memory of the real training loop", lambda p: import_module("training.speed").add_arguments(p), lambda a: import_module("training.speed").run(a)),
    "to-parquet": ("fleet CSV(s) -> a Parquet dataset partitioned by device or day, for streaming / distributed `train`", lambda p: import_module("training.to_parquet").add_arguments(p), lambda a: import_module("training.to_parquet").run(a)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else list(argv)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if argv[:1] == [name]:  # only the chosen command's module is imported (memory, start-up time)
            add_arguments(command_parser)
    args = parser.parse_args(argv)
    args.invocation = "python -m training " + shlex.join(argv)  # recorded in manifests
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
