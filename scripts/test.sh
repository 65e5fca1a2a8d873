#!/usr/bin/env bash
# The tests: edgecast with its training and dev extras in .venv (torch 2.13.0 CPU build), then pytest.
# Tests that need MQTT start their own mosquitto (the binary must be installed: apt-get install mosquitto).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[training,dev]"
exec .venv/bin/python -m pytest "$@"
