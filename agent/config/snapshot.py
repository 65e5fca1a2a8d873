"""Validated settings as plain read-only objects, so the daemon's process never imports pydantic.

pydantic and pydantic-settings, with the validators they build and the modules they pull in (asyncio, email,
dotenv, ...), stay resident for the life of a process: ~14 MiB, a tenth of the daemon's memory with 10,000
devices (docs/benchmarks.md). `python -m agent run` therefore validates its configuration in a forked child
(`load_in_child`), which sends back a `Snapshot` of it and exits: the same values, types (Path, int, ...) and
helper methods, read-only, with `model_copy(update=...)` as the daemon uses it. Everything else (check-config,
replay, the tests) keeps using the pydantic `Settings`; both have the same attributes.

This module imports nothing from pydantic; agent/config/settings.py builds snapshots (`freeze`) and shares the helper
methods below with its sections.
"""

from __future__ import annotations

import os
import pickle
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SNAPSHOT_FAILED = 70  # EX_SOFTWARE: the child died without a verdict


def credential_path(path: Path) -> Path:
    """A relative file name is looked up in $CREDENTIALS_DIRECTORY (systemd LoadCredential=) first."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and creds and (Path(creds) / path).is_file():
        return Path(creds) / path
    return path


# -- helper methods shared by the pydantic sections and their snapshots -------------------------------------------


class MqttMethods:
    """Needs: password, password_file, tls.enabled, plaintext_password, host, port."""

    def resolved_password(self) -> str | None:
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        return credential_path(self.password_file).read_text(encoding="utf-8").strip()

    def has_password(self) -> bool:
        return self.password is not None or self.password_file is not None

    def plaintext_password_problem(self) -> str | None:
        """Why the configured password must not be sent (no TLS and the policy forbids it), or None."""
        if not self.has_password() or self.tls.enabled or self.plaintext_password == "allow":
            return None
        if self.plaintext_password == "loopback" and self.host in LOOPBACK_HOSTS:
            return None
        return (
            f"refusing to send the broker password in plaintext to {self.host}:{self.port}: enable mqtt.tls, or set "
            f'mqtt.plaintext_password = "loopback" (127.0.0.1, ::1, localhost only) or "allow"'
        )


class ModelMethods:
    """Needs: public_key, public_key_file."""

    def resolved_public_keys(self) -> list[bytes]:
        """Every trusted 32-byte ed25519 key (any of them may sign a bundle); empty when bundles are not verified.

        `public_key`: one key or a list. `public_key_file`: one path or a list; each a file with one key per line
        (`#` comments), or a directory whose `*.pub` files are read; relative names are looked up in
        $CREDENTIALS_DIRECTORY first.
        """
        from agent.core.signing import PUBLIC_BYTES, SignatureError, parse_hex, parse_public_keys

        keys: list[bytes] = []
        texts = self.public_key
        for text in [texts] if isinstance(texts, str) else list(texts or []):
            try:
                keys.append(parse_hex(text, PUBLIC_BYTES, "the model public key"))
            except SignatureError as exc:
                raise ValueError(str(exc)) from None
        files = self.public_key_file
        for path in [files] if isinstance(files, (str, Path)) else list(files or []):
            path = credential_path(Path(path))
            sources = sorted(path.glob("*.pub")) if path.is_dir() else [path]
            if not sources:
                raise ValueError(f"{path} is a directory without *.pub files")
            for source in sources:
                try:
                    keys.extend(parse_public_keys(source.read_text(encoding="utf-8"), str(source)))
                except SignatureError as exc:
                    raise ValueError(str(exc)) from None
        return list(dict.fromkeys(keys))  # the same key listed twice is one key

    def resolved_public_key(self) -> bytes | None:
        """The first trusted key, or None (for callers that take one key; prefer resolved_public_keys)."""
        keys = self.resolved_public_keys()
        return keys[0] if keys else None


# -- snapshots --------------------------------------------------------------------------------------------------------


class Secret:
    """A secret string that does not show in reprs or logs (pydantic's SecretStr, without pydantic)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __getstate__(self) -> str:
        return self._value

    def __setstate__(self, state: str) -> None:
        self._value = state


class Snapshot:
    """One validated settings section: its fields as read-only attributes, nested sections as snapshots."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"settings are read-only in the running daemon (tried to set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"settings are read-only in the running daemon (tried to delete {name!r})")

    def model_copy(self, update: dict[str, Any] | None = None) -> "Snapshot":
        """A copy with some fields replaced (not validated again, like pydantic's model_copy)."""
        unknown = set(update or ()) - set(self.__dict__)
        if unknown:
            raise AttributeError(f"no settings {sorted(unknown)} in {type(self).__name__}")
        return type(self)({**self.__dict__, **(update or {})})

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.__dict__ == self.__dict__

    __hash__ = None  # type: ignore[assignment]  # equal by value, like the pydantic sections

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.__dict__.items())})"

    def __reduce__(self):
        return (type(self), (dict(self.__dict__),))


class MqttSnapshot(Snapshot, MqttMethods):
    pass


class ModelSnapshot(Snapshot, ModelMethods):
    pass


# The pydantic section class name -> its snapshot class (the rest are plain Snapshots).
SNAPSHOT_CLASSES: dict[str, type[Snapshot]] = {"MqttConfig": MqttSnapshot, "ModelConfig": ModelSnapshot, "ModelEntry": ModelSnapshot}


def load_in_child(load: Callable[[], tuple[Any, int | None]]) -> tuple[Snapshot | None, int | None]:
    """Run `load` (-> (settings, None), or (None, exit code) after printing why) in a forked child; here, the
    settings' snapshot, or the exit code with what the child printed written to this process's stdout/stderr.
    Where there is no fork, `load` runs in this process (and pydantic stays loaded)."""
    if not hasattr(os, "fork"):
        settings, code = load()
        return (None, code) if settings is None else (_freeze(settings), None)
    sys.stdout.flush()
    sys.stderr.flush()  # or the child would write the parent's buffered output a second time
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns, so nothing of the parent's (tests, atexit) runs twice
        _child(load, read_end, write_end)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    if not data:  # killed before it could answer
        print("edgecast-agent: error: the configuration check ended without a result", file=sys.stderr)
        return None, SNAPSHOT_FAILED
    snapshot, code, out, err = pickle.loads(data)  # our own child's bytes, over a pipe only we hold
    sys.stdout.write(out)
    sys.stderr.write(err)
    return snapshot, code


def _child(load: Callable[[], tuple[Any, int | None]], read_end: int, write_end: int) -> None:
    import io

    os.close(read_end)
    out, err = io.StringIO(), io.StringIO()
    sys.stdout, sys.stderr = out, err  # relayed to the parent, which prints them where its own output goes
    snapshot, code = None, SNAPSHOT_FAILED
    try:
        settings, code = load()
        if settings is not None:
            snapshot, code = _freeze(settings), None
    except BaseException:  # noqa: BLE001 - a bug: the parent prints the traceback and exits with SNAPSHOT_FAILED
        traceback.print_exc()
        snapshot, code = None, SNAPSHOT_FAILED
    try:
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(pickle.dumps((snapshot, code, out.getvalue(), err.getvalue()), protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        os._exit(0)


def _freeze(settings: Any) -> Snapshot:
    from agent.config.settings import freeze  # in the child (or without fork): pydantic is loaded there anyway

    return freeze(settings)
