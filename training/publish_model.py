"""`python -m training publish-model DIR --topic TOPIC [--key KEY [--release N]]`: roll a bundle out to a fleet over MQTT.

The bundle is checked first (the agent's own loader: checksum, shapes, warm-up), signed with KEY as a new release
(`sign-model`'s rules: the release number and optional expiry are written into manifest.json and signed; the
default number is one more than the highest of the manifest's release and the release now retained on TOPIC), or
its existing manifest.json.sig is used; then packed (agent/ops/rollout.py) and published retained: the chunks on
TOPIC/chunks/<transfer_id>/<index>, then the descriptor on TOPIC. Daemons with `[rollout] enabled = true` and
`rollout.topic = TOPIC` fetch it, verify signature and checksums, and swap it in; each reports the model it
runs on its status topic. The previous transfer's retained chunks are cleared afterwards, so the broker
keeps one bundle per topic. `--clear` withdraws the topic's bundle (daemons keep the model they run).

Staged rollout: one topic per stage (e.g. .../canary, .../all); see docs/fleet.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from agent.ops import releases

from agent.ops import rollout

from agent.core import signing
from training.sign import add_release_arguments, next_release, read_secret, sign_bundle


class PublishError(Exception):
    """The bundle or the broker said no; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, nargs="?", help="bundle folder (model.onnx + manifest.json)")
    parser.add_argument("--topic", required=True, help="model-update topic the daemons' rollout.topic names, e.g. edgecast/models/pump-lstm")
    parser.add_argument("--key", type=Path, help="secret key file from `python -m training keygen` (else the bundle's manifest.json.sig is used)")
    add_release_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="broker host (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="broker port (default: 1883)")
    parser.add_argument("--username", help="broker user name")
    parser.add_argument("--password-file", type=Path, help="file holding the broker password")
    parser.add_argument("--ca-file", type=Path, help="connect with TLS, verifying the broker against this CA bundle")
    parser.add_argument("--chunk-kib", type=int, default=rollout.DEFAULT_CHUNK_BYTES // 1024, help="chunk size in KiB (default: 256)")
    parser.add_argument("--clear", action="store_true", help="withdraw the bundle published on --topic (no DIR needed)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the broker's acknowledgements (default: 60)")
    parser.epilog = (
        "examples:\n"
        "  python -m training keygen keys/model-signing\n"
        "  python -m training publish-model exported_models/my-pump --topic edgecast/models/pump-lstm/canary --key keys/model-signing --expires 90d\n"
        "  python -m training publish-model exported_models/my-pump --topic edgecast/models/pump-lstm/all   # the same signed release, next stage\n"
        "  python -m training publish-model --clear --topic edgecast/models/pump-lstm/canary"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _sign(folder: Path, key_file: Path | None, verify: bool, release: int | None = None, expires: str | None = None,
          rollback_to: int | None = None, previous_release: int | None = None) -> bytes:
    """The hex text of manifest.json.sig to ship: a new release signed with `key_file` (written into the folder, as
    `sign-model` does), or the bundle's existing signature."""
    from agent.core.model import BundleError, load_bundle

    if key_file is not None:
        secret = read_secret(key_file)
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        if release is None:
            release = next_release(manifest, previous_release)
        if release is None:
            raise PublishError(f"give --release N: neither {folder / 'manifest.json'} nor the topic names an earlier release "
                               f"of {manifest.get('name')!r} (1 for the first signed release)")
        try:
            _, signature = sign_bundle(folder, secret, release, expires, rollback_to, verify=verify)
        except releases.ReleaseError as exc:
            raise PublishError(str(exc)) from None
        return (signature.hex() + "\n").encode("ascii")
    if release is not None or expires is not None or rollback_to is not None:
        raise PublishError("--release, --expires and --rollback-to need --key: the release fields are signed with the bundle")
    sig_file = folder / signing.SIGNATURE_FILE
    if not sig_file.is_file():
        raise PublishError(f"{folder} is not signed and no --key was given; agents accept only signed bundles")
    signature = signing.parse_hex(sig_file.read_text(), 64, str(sig_file))
    if verify:
        try:
            load_bundle(folder)  # never publish what every agent would refuse (checksum, shapes, warm-up)
        except BundleError as exc:
            raise PublishError(f"bundle {folder} refused: {exc}") from None
    return (signature.hex() + "\n").encode("ascii")


def release_of(descriptor: bytes | None) -> int | None:
    """The release a retained descriptor announces (unsigned: only a hint for the next number), or None."""
    try:
        value = json.loads(descriptor)["release"] if descriptor else None
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= releases.MAX_RELEASE else None


def _check_newer(topic: str, descriptor: dict, previous: bytes | None, verify: bool) -> None:
    """Refuse to publish a release the agents on `topic` would refuse as not newer (unless it is the same transfer)."""
    before = release_of(previous)
    if not verify or before is None or (descriptor.get("release") or 0) > before:
        return
    try:
        if json.loads(previous)["transfer_id"] == descriptor["transfer_id"]:
            return  # publishing the same bundle again: harmless
    except (ValueError, KeyError, TypeError):
        pass
    what = f"release {descriptor['release']}" if "release" in descriptor else "a bundle without a release number"
    raise PublishError(
        f"{descriptor['name']} {descriptor['version']} is {what}, not newer than release {before} on {topic}: agents refuse it "
        f"(rollback protection). To roll back, sign the old bundle again as a new release: --key KEY --release {before + 1} "
        f"--rollback-to <its release>"
    )


class _Connection:
    """A short-lived paho client: connect, read a retained message, publish QoS 1 and wait for the acks."""

    def __init__(self, host: str, port: int, username: str | None, password: str | None, ca_file: Path | None, timeout: float):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.timeout = timeout
        self._connected = threading.Event()
        self._suback = threading.Event()
        self._refused: str | None = None
        self.retained: dict[str, bytes] = {}
        client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="", protocol=paho.MQTTv311, clean_session=True)
        if username:
            client.username_pw_set(username, password)
        if ca_file is not None:
            client.tls_set(ca_certs=str(ca_file))
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *a: self._suback.set()
        client.on_message = lambda c, u, m: self.retained.__setitem__(m.topic, bytes(m.payload)) if m.retain else None
        self.client = client
        client.connect_async(host, port, keepalive=30)
        client.loop_start()
        if not self._connected.wait(timeout) or self._refused:
            client.loop_stop()
            raise PublishError(f"cannot connect to the broker at {host}:{port}: {self._refused or 'no answer'}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = str(reason_code)
        self._connected.set()

    def read_retained(self, topic: str, grace_s: float = 0.5) -> bytes | None:
        """The topic's retained message, if the broker has one (it arrives right after the SUBACK)."""
        self._suback.clear()
        self.client.subscribe(topic, qos=1)
        if not self._suback.wait(self.timeout):
            raise PublishError(f"no SUBACK for {topic}")
        threading.Event().wait(grace_s)  # the retained message follows the SUBACK; nothing signals its absence
        self.client.unsubscribe(topic)
        return self.retained.get(topic)

    def publish_all(self, messages: list[tuple[str, bytes]]) -> None:
        infos = [self.client.publish(topic, payload, qos=1, retain=True) for topic, payload in messages]
        deadline = time.monotonic() + self.timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise PublishError(f"the broker did not acknowledge the publish within {self.timeout:.0f}s")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _clear_previous(conn: _Connection, topic: str, previous: bytes | None, keep_transfer: str | None) -> int:
    """Delete the retained chunks of the descriptor that was on `topic` (unless it is the one just published)."""
    if not previous:
        return 0
    try:
        old = json.loads(previous)
        transfer, chunks = old["transfer_id"], int(old["chunks"])
    except (ValueError, KeyError, TypeError):
        return 0
    if transfer == keep_transfer or not isinstance(transfer, str):
        return 0
    conn.publish_all([(rollout.chunk_topic(topic, transfer, i), b"") for i in range(min(chunks, rollout.MAX_CHUNKS))])
    return chunks


def publish_bundle(
    folder: str | Path,
    topic: str,
    host: str = "127.0.0.1",
    port: int = 1883,
    key_file: str | Path | None = None,
    chunk_bytes: int = rollout.DEFAULT_CHUNK_BYTES,
    verify: bool = True,
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | None = None,
    timeout: float = 60.0,
    release: int | None = None,
    expires: str | None = None,
    rollback_to: int | None = None,
) -> dict:
    """Publish a bundle (chunks, then the descriptor, all retained); returns the descriptor.

    With `key_file` the bundle is signed as `release` (default: one more than the manifest's or the topic's
    release), with the optional `expires` (ISO-8601) and `rollback_to`. `verify=False` skips the local checks:
    only for tests that need agents to refuse a bad bundle.
    """
    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        raise PublishError(f"{folder / 'manifest.json'} not found (a bundle is model.onnx + manifest.json)")
    conn = _Connection(host, port, username, password, ca_file, timeout)
    try:
        previous = conn.read_retained(topic)
        try:
            signature = _sign(folder, Path(key_file) if key_file else None, verify, release, expires, rollback_to, release_of(previous))
        except (OSError, ValueError, signing.SignatureError) as exc:
            raise PublishError(str(exc)) from None
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        archive = rollout.pack_bundle(folder, signature)
        descriptor = rollout.make_descriptor(archive, manifest, chunk_bytes, signed=True)
        _check_newer(topic, descriptor, previous, verify)
        chunks = rollout.split_chunks(archive, chunk_bytes)
        conn.publish_all([(rollout.chunk_topic(topic, descriptor["transfer_id"], i), chunk) for i, chunk in enumerate(chunks)])
        conn.publish_all([(topic, json.dumps(descriptor, separators=(",", ":")).encode("utf-8"))])
        _clear_previous(conn, topic, previous, descriptor["transfer_id"])
    finally:
        conn.close()
    return descriptor


def clear_topic(topic: str, host: str = "127.0.0.1", port: int = 1883, username: str | None = None, password: str | None = None,
                ca_file: Path | None = None, timeout: float = 60.0) -> int:
    """Remove the retained descriptor and chunks from `topic`; returns the number of chunks cleared."""
    conn = _Connection(host, port, username, password, ca_file, timeout)
    try:
        previous = conn.read_retained(topic)
        conn.publish_all([(topic, b"")])
        return _clear_previous(conn, topic, previous, None)
    finally:
        conn.close()


def run(args: argparse.Namespace) -> int:
    password = args.password_file.read_text().strip() if args.password_file else None
    try:
        if args.clear:
            cleared = clear_topic(args.topic, args.host, args.port, args.username, password, args.ca_file, args.timeout)
            print(f"cleared {args.topic} ({cleared} chunks)")
            return 0
        if args.bundle is None:
            print("error: give the bundle folder DIR (or --clear)", file=sys.stderr)
            return 2
        if args.chunk_kib < 1:
            print("error: --chunk-kib must be at least 1", file=sys.stderr)
            return 2
        started = time.monotonic()
        expires = releases.parse_expiry(args.expires) if args.expires else None
        descriptor = publish_bundle(args.bundle, args.topic, args.host, args.port, args.key, args.chunk_kib * 1024,
                                    username=args.username, password=password, ca_file=args.ca_file, timeout=args.timeout,
                                    release=args.release, expires=expires, rollback_to=args.rollback_to)
    except (PublishError, OSError, releases.ReleaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"published {descriptor['name']} {descriptor['version']} "
        f"({'release ' + str(descriptor['release']) if 'release' in descriptor else 'no release number'}"
        f"{', expires ' + descriptor['expires'] if 'expires' in descriptor else ''}) on {args.topic}: transfer {descriptor['transfer_id']}, "
        f"{descriptor['archive_bytes']} bytes in {descriptor['chunks']} chunk(s), retained ({time.monotonic() - started:.1f}s).\n"
        f"Agents with rollout.topic = \"{args.topic}\" verify and swap it in; watch their status topics "
        f"(mosquitto_sub -t 'edgecast/agent/+/status' -v)."
    )
    return 0
