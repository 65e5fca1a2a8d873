"""Broker security: TLS with server verification, mutual TLS, user/password with an ACL; secrets never shown.

mosquitto is configured by the test: a TLS listener that requires a client certificate (for the agent) and a
plain loopback listener (for the test's probe), a password file and an ACL; certificates are made here with
`cryptography`.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import AGENT_ID, PREFIX, REPO, Broker, MqttProbe, free_port, healthy_rows, publish_rows, run_mosquitto

pytestmark = pytest.mark.mqtt
from cryptography import x509  # noqa: E402  (dev extra)
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

SECRET = "s3cret-tls-pass-word"


def _name(cn: str):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def make_ca(folder: Path, cn: str):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / f"{cn}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def issue(folder: Path, ca, cn: str, server: bool) -> tuple[Path, Path]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = folder / f"{cn}.crt", folder / f"{cn}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, key_path)
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "edgecast-test-ca")
    rogue = make_ca(folder, "rogue-ca")
    server_crt, server_key = issue(folder, ca, "broker", server=True)
    client_crt, client_key = issue(folder, ca, "edge-client", server=True if False else False)
    rogue_crt, rogue_key = issue(folder, rogue, "rogue-client", server=False)
    return {"ca": folder / "edgecast-test-ca.pem", "rogue_ca": folder / "rogue-ca.pem", "server_crt": server_crt,
            "server_key": server_key, "client_crt": client_crt, "client_key": client_key, "rogue_crt": rogue_crt, "rogue_key": rogue_key}


@pytest.fixture
def secure_broker(tmp_path, pki):
    """(plain Broker for the probe, TLS port for the agent): passwords required, an ACL, client certs required on TLS."""
    passwd = tmp_path / "passwd"
    for i, (user, password) in enumerate((("edge", SECRET), ("probe", "probe-pass"))):
        args = ["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) + [str(passwd), user, password]
        subprocess.run(args, check=True, capture_output=True)
    acl = tmp_path / "acl"
    # The agent may read sensors and write its own prefix; nothing else (e.g. not other agents' commands).
    acl.write_text("user edge\ntopic read sensors/#\ntopic write edgecast/#\n\nuser probe\ntopic readwrite #\n")
    tls_port = free_port()
    conf = (
        f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
        f"listener {tls_port} 127.0.0.1\ncafile {pki['ca']}\ncertfile {pki['server_crt']}\nkeyfile {pki['server_key']}\n"
        f"require_certificate true\ntls_version tlsv1.2\n"
    )
    with run_mosquitto(tmp_path / "secure-broker", conf) as plain:
        yield plain, tls_port


def tls_settings(agent_settings, tls_port: int, creds: Path, **tls):
    return agent_settings(mqtt={"port": tls_port, "username": "edge", "password_file": "mqtt-password",
                                "tls": {"enabled": True, **tls}, "reconnect_max_s": 1.0})


@pytest.fixture
def creds(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "credentials"
    folder.mkdir()
    (folder / "mqtt-password").write_text(SECRET + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(folder))
    return folder


def test_mutual_tls_with_password_and_acl_serves_end_to_end(secure_broker, pki, creds, agent_settings, caplog):
    """Verified server cert + client cert + password (from $CREDENTIALS_DIRECTORY): connected, forecasts flow."""
    from agent.app import Agent

    plain, tls_port = secure_broker
    settings = tls_settings(agent_settings, tls_port, creds, ca_file=str(pki["ca"]), cert_file=str(pki["client_crt"]), key_file=str(pki["client_key"]))
    probe = MqttProbe(plain, "probe", subscribe=None, username="probe", password="probe-pass")
    probe.subscribe([f"{PREFIX}/#"])
    agent = Agent(settings)
    with caplog.at_level(logging.DEBUG):
        agent.start()
        try:
            assert agent.wait_connected(10), caplog.text
            probe.expect(f"{PREFIX}/agent/{AGENT_ID}/status", lambda m: m.json()["state"] == "online", timeout=10)
            publish_rows(probe, healthy_rows(devices=1, rows=60, seed=1))
            probe.expect(f"{PREFIX}/pump-00/forecast", timeout=20)
        finally:
            agent.stop()
            probe.close()
    assert SECRET not in caplog.text


@pytest.mark.parametrize("case", ["no_client_cert", "rogue_client_cert", "server_from_another_ca", "wrong_password"])
def test_refused_connections(secure_broker, pki, creds, agent_settings, caplog, case):
    """A missing or untrusted client cert, an unverifiable server or a wrong password: never connected, secret unlogged."""
    from agent.app import Agent

    _, tls_port = secure_broker
    tls = {"ca_file": str(pki["ca"]), "cert_file": str(pki["client_crt"]), "key_file": str(pki["client_key"])}
    if case == "no_client_cert":
        tls = {"ca_file": str(pki["ca"])}
    elif case == "rogue_client_cert":
        tls.update(cert_file=str(pki["rogue_crt"]), key_file=str(pki["rogue_key"]))
    elif case == "server_from_another_ca":
        tls["ca_file"] = str(pki["rogue_ca"])
    else:
        (creds / "mqtt-password").write_text("not-" + SECRET)
    agent = Agent(tls_settings(agent_settings, tls_port, creds, **tls))
    with caplog.at_level(logging.DEBUG):
        agent.start()
        try:
            assert not agent.wait_connected(3)
        finally:
            agent.stop()
    assert SECRET not in caplog.text
    if case == "server_from_another_ca":
        assert "certificate verify failed" in caplog.text or "CERTIFICATE_VERIFY_FAILED" in caplog.text, caplog.text


@pytest.mark.parametrize("host, policy, refused", [
    ("127.0.0.1", "refuse", True), ("broker.example", "loopback", True), ("127.0.0.1", "loopback", False), ("broker.example", "allow", False),
])
def test_password_is_never_sent_in_plaintext_unless_allowed(agent_settings, host, policy, refused):
    """Without TLS a password is refused at start (clear message) unless mqtt.plaintext_password allows it."""
    from agent.transport.mqtt import MqttLink, Retained

    settings = agent_settings(mqtt={"host": host, "username": "edge", "password": SECRET, "plaintext_password": policy})
    make = lambda: MqttLink(settings, [], lambda *a: None, will=Retained("t", b"x"))  # noqa: E731
    if refused:
        with pytest.raises(ValueError, match="refusing to send the broker password in plaintext") as error:
            make()
        assert SECRET not in str(error.value)
    else:
        make()


def run_cli(args: list[str], env_extra: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECAST_")}
    env.update(env_extra, EDGECAST_STATE__DIRECTORY=str(tmp_path / "state"), EDGECAST_LOG__LEVEL="DEBUG")
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def test_daemon_refuses_plaintext_password_and_never_prints_secrets(tmp_path, mosquitto):
    """`run` and `check-config` exit 1 naming the setting; `check-config` masks the env password, never shows the file's."""
    broker: Broker = mosquitto
    env = {"EDGECAST_MQTT__PORT": str(broker.port), "EDGECAST_MQTT__USERNAME": "edge", "EDGECAST_MQTT__PASSWORD": SECRET}
    run = run_cli(["run"], env, tmp_path)
    assert run.returncode == 1
    assert "mqtt.plaintext_password" in run.stderr and SECRET not in run.stdout + run.stderr
    check = run_cli(["check-config", "--no-model"], env, tmp_path)
    assert check.returncode == 1 and "mqtt.plaintext_password" in check.stderr and SECRET not in check.stdout + check.stderr
    assert json.loads(check.stdout)["mqtt"]["password"] == "**********"
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET)
    env.pop("EDGECAST_MQTT__PASSWORD")
    env["EDGECAST_MQTT__PLAINTEXT_PASSWORD"] = "loopback"
    check = run_cli(["check-config", "--no-model"], {**env, "EDGECAST_MQTT__PASSWORD_FILE": str(secret_file)}, tmp_path)
    assert check.returncode == 0 and SECRET not in check.stdout + check.stderr
