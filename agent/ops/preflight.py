"""What `run` refuses before it touches the network, checked by one function that `check-config` and `run` share.

`problems(settings)` reads what the daemon reads at start (secret and TLS files, the model public key, the
state directory), checks the password-without-TLS policy, the CPU of inference.model_cpu and the metrics extra,
and returns every problem, each naming its setting: `mqtt.password_file: /etc/x: No such file or directory`.
The model bundle itself is verified by `check-config` (unless --no-model) and by the daemon's start.

Works on the pydantic Settings (check-config) and on the daemon's read-only Snapshot alike; no pydantic here.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.ops import affinity
from agent.config.snapshot import credential_path


@dataclass(frozen=True)
class Problem:
    setting: str  # dotted path, e.g. "mqtt.password_file"
    message: str

    def __str__(self) -> str:
        return self.message if self.message.startswith(self.setting) else f"{self.setting}: {self.message}"


def describe(found: list[Problem]) -> str:
    """One line for one problem; a count and one indented line each for several."""
    if len(found) == 1:
        return str(found[0])
    return f"{len(found)} configuration problems:\n" + "\n".join(f"  {p}" for p in found)


def _os_error(exc: OSError, path: Path | str) -> str:
    return f"{exc.filename or path}: {exc.strerror or exc}"


def _read(setting: str, path: Path, found: list[Problem], credential: bool = False) -> bytes | None:
    """The file's bytes, or None after noting why not; `credential`: a relative name is looked up in
    $CREDENTIALS_DIRECTORY first (as the daemon does for secrets)."""
    resolved = credential_path(Path(path)) if credential else Path(path)
    try:
        return resolved.read_bytes()
    except OSError as exc:
        found.append(Problem(setting, _os_error(exc, resolved)))
        return None


def problems(settings: Any) -> list[Problem]:
    """Every reason `run` would refuse `settings` before connecting (the model bundle aside)."""
    found: list[Problem] = []
    _check_mqtt(settings.mqtt, found)
    for k, entry in enumerate(settings.models) if settings.models else [(None, settings.model)]:
        _check_model_key(entry, found, "model" if k is None else f"models[{k}]")
    inference, partition = settings.inference, settings.partition
    try:
        affinity.placement(inference.model_cpu, affinity.usable_cpus(), (partition.count, partition.index), settings.model.intra_op_threads)
    except ValueError as exc:
        found.append(Problem("inference.model_cpu", str(exc)))
    if settings.outbox.enabled:
        _check_state_directory(Path(settings.state.directory), found)
    if settings.sparkplug.enabled:
        try:
            import agent.transport.sparkplug  # noqa: F401
        except ImportError as exc:
            found.append(Problem("sparkplug.enabled", f"the Sparkplug B input needs protobuf: pip install 'edgecast[sparkplug]' ({exc})"))
    if settings.metrics.enabled:
        from agent.ops.metrics import MetricsUnavailable, _prometheus

        try:
            _prometheus()
        except MetricsUnavailable as exc:
            found.append(Problem("metrics.enabled", str(exc)))
    return found


def _check_mqtt(mqtt: Any, found: list[Problem]) -> None:
    if mqtt.password_file is not None:
        data = _read("mqtt.password_file", mqtt.password_file, found, credential=True)
        if data is not None:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                found.append(Problem("mqtt.password_file", f"{credential_path(Path(mqtt.password_file))}: not UTF-8 text"))
    plaintext = mqtt.plaintext_password_problem()
    if plaintext is not None:
        found.append(Problem("mqtt.plaintext_password", plaintext))
    tls = mqtt.tls
    if not tls.enabled:
        return
    # As paho's tls_set does at start: the client certificate chain, then the CA bundle (or the system store).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if tls.cert_file is not None:
        readable = [_read(f"mqtt.tls.{name}", getattr(tls, name), found) is not None for name in ("cert_file", "key_file")]
        if all(readable):
            try:
                context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
            except (ssl.SSLError, OSError) as exc:
                found.append(Problem("mqtt.tls.cert_file", f"{tls.cert_file} with mqtt.tls.key_file {tls.key_file}: not a usable "
                                     f"certificate and private key pair ({exc})"))
    if tls.ca_file is not None and _read("mqtt.tls.ca_file", tls.ca_file, found) is not None:
        try:
            context.load_verify_locations(str(tls.ca_file))
        except (ssl.SSLError, OSError) as exc:
            found.append(Problem("mqtt.tls.ca_file", f"{tls.ca_file}: not a usable CA bundle ({exc})"))


def _check_model_key(model: Any, found: list[Problem], where: str = "model") -> None:
    if model.public_key_file is None:
        return
    try:
        model.resolved_public_key()
    except OSError as exc:
        found.append(Problem(f"{where}.public_key_file", _os_error(exc, model.public_key_file)))
    except ValueError as exc:  # not hex, wrong length, not UTF-8
        found.append(Problem(f"{where}.public_key_file", f"{model.public_key_file}: {exc}"))


def _check_state_directory(directory: Path, found: list[Problem]) -> None:
    """The outbox is created there at start: the directory, or the nearest existing folder above it, must be writable."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        found.append(Problem("state.directory", f"{directory}: {existing} is not a directory"))
    elif not os.access(existing, os.W_OK | os.X_OK):
        found.append(Problem("state.directory", f"{directory}: {existing} is not writable by this user"))
