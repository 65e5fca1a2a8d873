#!/usr/bin/env bash
# The demo: the edge install of edgecast (no torch) plus the demo extra (amqtt, the embedded MQTT broker used
# when mosquitto is not installed) in .venv, then the whole loop for about two minutes:
# broker (mosquitto, or the embedded amqtt one) -> simulated pump fleet -> daemon -> live view -> summary.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check ".[demo]"
exec .venv/bin/python -m training demo "$@"
