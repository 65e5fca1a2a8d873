"""`check-config` refuses what `run` refuses before connecting, with the same message naming the setting.

Both commands run as processes here, on the same configuration file and environment (a real broker for `run`):
a configuration `check-config` passes must not be one the daemon then refuses to start with.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import PYTHON, REPO, agent_env

pytestmark = pytest.mark.mqtt

SECRET = "pre-flight-s3cret"
ERROR_PREFIX = "edgecast-agent: error: "


def cases(tmp: Path) -> dict[str, tuple[str, dict[str, str], str]]:
    """name -> (TOML text, extra environment, what the refusal must say)."""
    return {
        "missing_password_file": (
            f'[mqtt]\nusername = "edge"\npassword_file = "{tmp / "no-such-password"}"\nplaintext_password = "loopback"\n',
            {},
            f"mqtt.password_file: {tmp / 'no-such-password'}: No such file or directory",
        ),
        "password_without_tls_to_a_remote_host": (
            f'[mqtt]\nusername = "edge"\npassword = "{SECRET}"\nplaintext_password = "loopback"\n',
            {"EDGECAST_MQTT__HOST": "broker.example"},  # the environment wins over the file (start_daemon sets the host)
            "mqtt.plaintext_password: refusing to send the broker password in plaintext to broker.example",
        ),
        "missing_tls_ca_file": (
            f'[mqtt.tls]\nenabled = true\nca_file = "{tmp / "no-such-ca.pem"}"\n',
            {},
            f"mqtt.tls.ca_file: {tmp / 'no-such-ca.pem'}: No such file or directory",
        ),
        "unusable_model_cpu": ("[inference]\nmodel_cpu = 4095\n", {}, "inference.model_cpu = 4095 is not a CPU this process may use"),
    }


@pytest.mark.parametrize("case", ["missing_password_file", "password_without_tls_to_a_remote_host", "missing_tls_ca_file", "unusable_model_cpu"])
def test_check_config_refuses_what_run_refuses_with_the_same_message(start_daemon, mosquitto, model_path, tmp_path, case):
    """check-config exits 1 naming the setting for a config `run` refuses; `run` exits 1 with the same message."""
    toml, env, expected = cases(tmp_path)[case]
    config = tmp_path / "agent.toml"
    config.write_text(toml)
    env = {"EDGECAST_STATE__DIRECTORY": str(tmp_path / "state"), **env}

    check = subprocess.run([PYTHON, "-m", "agent", "check-config", "--config", str(config)], cwd=REPO,
                           env=agent_env(mosquitto, model_path, **env), capture_output=True, text=True, timeout=60)
    assert check.returncode == 1, check.stdout + check.stderr
    refusal = [line for line in check.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(refusal) == 1 and expected in refusal[0], check.stderr
    assert "Errno" not in check.stderr and SECRET not in check.stdout + check.stderr

    daemon = start_daemon(env=env, args=["--config", str(config)])
    assert daemon.wait(30) == 1
    log = daemon.log()
    assert refusal[0] in log, f"run must refuse with check-config's message {refusal[0]!r}:\n{log}"
    assert "Errno" not in log and SECRET not in log


def test_check_config_passes_what_run_accepts(mosquitto, model_path, tmp_path):
    """The same settings made valid (password file present, loopback broker, no CA file) pass check-config (exit 0)."""
    password = tmp_path / "password"
    password.write_text(SECRET + "\n")
    config = tmp_path / "agent.toml"
    config.write_text(f'[mqtt]\nusername = "edge"\npassword_file = "{password}"\nplaintext_password = "loopback"\n')
    check = subprocess.run([PYTHON, "-m", "agent", "check-config", "--config", str(config)], cwd=REPO,
                           env=agent_env(mosquitto, model_path, EDGECAST_STATE__DIRECTORY=str(tmp_path / "state")),
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "model bundle OK" in check.stderr and SECRET not in check.stdout + check.stderr
