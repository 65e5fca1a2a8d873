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
    from training import synth

    synth.add_arguments(parser)


def _synth_run(args: argparse.Namespace) -> int:
    from training import synth

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
    "synth": ("generate a synthetic pump fleet (CSV and/or MQTT)", _synth_args, _synth_run),
    "train": ("train, export and calibrate a bundle from a fleet CSV", _train_args, _train_run),
    "build-shipped": ("regenerate exported_models/pump-lstm from a fixed-seed synthetic fleet", _build_shipped_args, _build_shipped_run),
    "broker": ("run the embedded MQTT 3.1.1 broker (for machines without mosquitto)", lambda p: import_module("training.minibroker").add_arguments(p), lambda a: import_module("training.minibroker").run(a)),
    "demo": ("the one-command demo: simulator -> broker -> edge daemon -> live view and summary", lambda p: import_module("training.demo").add_arguments(p), lambda a: import_module("training.demo").run(a)),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.invocation = "python -m training " + shlex.join(argv)  # recorded in manifests
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
