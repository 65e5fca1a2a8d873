"""Fleet model rollout over MQTT: the wire format and the receiving side (no paho here; agent/transport/mqtt.py carries it).

A published bundle is a gzip'd tar of its files (manifest.json, model.onnx, manifest.json.sig, optional
README.md / report.json), cut into chunks:

    TOPIC                                   retained descriptor (JSON, schema agent/schemas/model_descriptor.json)
    TOPIC/chunks/<transfer_id>/<index>      retained raw bytes of chunk <index> (0-based)

`python -m training publish-model` publishes the chunks first and the descriptor last, so whoever sees a
descriptor finds every chunk. `transfer_id` is the first 16 hex digits of the archive's sha256.

A daemon with `[rollout] enabled = true` subscribes to TOPIC. A descriptor for a model other than the running
one makes it subscribe to that transfer's chunks (the broker delivers the retained ones at once), collect
them, and hand the archive to the agent, which checks the archive's sha256, unpacks it into
state.directory/models/, and loads it with the signature required (model.public_key), checksum, shapes and
warm-up checked: the same path as a reload. Nothing from the network reaches the pipeline unverified.

The descriptor repeats the manifest's release fields (`release`, `expires`, `rollback_to`) for people and tools
watching the topic; they are not signed there. The agent decides on the signed copies in manifest.json, through
its release ledger (agent/ops/releases.py): a release not newer than the one it accepted, or an expired one, is refused.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import re
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DESCRIPTOR_SCHEMA_VERSION = 1
BUNDLE_FILES = ("manifest.json", "model.onnx", "manifest.json.sig", "README.md", "report.json")
REQUIRED_FILES = ("manifest.json", "model.onnx")
DEFAULT_CHUNK_BYTES = 256 * 1024
MAX_CHUNKS = 100_000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TRANSFER = re.compile(r"^[0-9a-f]{16}$")


class RolloutError(Exception):
    """A published bundle that cannot be used; the message says why."""


def chunk_filter(topic: str, transfer_id: str) -> str:
    return f"{topic}/chunks/{transfer_id}/+"


def chunk_topic(topic: str, transfer_id: str, index: int) -> str:
    return f"{topic}/chunks/{transfer_id}/{index}"


# -- packing (publisher side) --------------------------------------------------------------------------------


def pack_bundle(folder: str | Path, signature: bytes | None = None) -> bytes:
    """The bundle's files as a gzip'd tar (fixed mtimes, so the same bundle gives the same archive).

    `signature` (hex text of manifest.json.sig) replaces a signature file in the folder.
    """
    folder = Path(folder)
    buffer = io.BytesIO()
    # mtime 0 in the gzip header and the tar entries: the archive depends on the files' bytes only.
    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name in BUNDLE_FILES:
            if name == "manifest.json.sig" and signature is not None:
                data = signature
            elif (folder / name).is_file():
                data = (folder / name).read_bytes()
            else:
                if name in REQUIRED_FILES:
                    raise RolloutError(f"{folder / name} not found (a bundle is model.onnx + manifest.json)")
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_descriptor(archive: bytes, manifest: dict, chunk_bytes: int, signed: bool, published_at: float | None = None) -> dict:
    archive_sha = hashlib.sha256(archive).hexdigest()
    release = {key: manifest[key] for key in ("release", "expires", "rollback_to") if manifest.get(key) is not None}
    return {
        "schema_version": DESCRIPTOR_SCHEMA_VERSION,
        "transfer_id": archive_sha[:16],
        "name": manifest["name"],
        "version": manifest["version"],
        "model_sha256": manifest["onnx"]["sha256"],
        "archive_sha256": archive_sha,
        "archive_bytes": len(archive),
        "chunk_bytes": chunk_bytes,
        "chunks": max(1, -(-len(archive) // chunk_bytes)),
        "signed": signed,
        "published_at": round(time.time() if published_at is None else published_at),
        **release,
    }


def split_chunks(archive: bytes, chunk_bytes: int) -> list[bytes]:
    return [archive[i : i + chunk_bytes] for i in range(0, len(archive), chunk_bytes)] or [b""]


# -- unpacking (agent side) ------------------------------------------------------------------------------------


def unpack_bundle(archive: bytes, dest: Path) -> None:
    """Write the archive's known bundle files into `dest` (created); anything else in it is an error.

    Only plain files with the expected names are accepted: no paths, links or devices can come from the network.
    """
    dest.mkdir(parents=True, exist_ok=False)
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            seen = set()
            for member in tar.getmembers():
                if not member.isfile() or member.name not in BUNDLE_FILES or member.name in seen:
                    raise RolloutError(f"unexpected entry {member.name!r} in the published bundle (only {', '.join(BUNDLE_FILES)})")
                seen.add(member.name)
                source = tar.extractfile(member)
                assert source is not None
                (dest / member.name).write_bytes(source.read())
    except (tarfile.TarError, EOFError, OSError) as exc:  # truncated or not a gzip'd tar
        raise RolloutError(f"the published bundle is not a readable archive: {exc}") from None
    missing = [name for name in REQUIRED_FILES if not (dest / name).is_file()]
    if missing:
        raise RolloutError(f"the published bundle lacks {missing}")


def check_descriptor(payload: bytes, max_bytes: int) -> dict:
    """The parsed descriptor, or RolloutError naming the first problem."""
    try:
        descriptor = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RolloutError(f"the model descriptor is not JSON: {exc}") from None
    if not isinstance(descriptor, dict):
        raise RolloutError("the model descriptor must be a JSON object")
    if descriptor.get("schema_version") != DESCRIPTOR_SCHEMA_VERSION:
        raise RolloutError(f"model descriptor schema_version {descriptor.get('schema_version')!r}; this agent reads {DESCRIPTOR_SCHEMA_VERSION}")
    for key in ("name", "version"):
        if not isinstance(descriptor.get(key), str) or not descriptor[key]:
            raise RolloutError(f"model descriptor {key} must be a non-empty string")
    if not isinstance(descriptor.get("transfer_id"), str) or not _TRANSFER.match(descriptor["transfer_id"]):
        raise RolloutError("model descriptor transfer_id must be 16 lowercase hex digits")
    for key in ("archive_sha256", "model_sha256"):
        if not isinstance(descriptor.get(key), str) or not _HEX64.match(descriptor[key]):
            raise RolloutError(f"model descriptor {key} must be 64 lowercase hex digits")
    if not descriptor["archive_sha256"].startswith(descriptor["transfer_id"]):
        raise RolloutError("model descriptor transfer_id is not the start of archive_sha256")
    for key in ("release", "rollback_to"):
        value = descriptor.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise RolloutError(f"model descriptor {key} must be a positive integer, got {value!r}")
    for key, upper in (("archive_bytes", max_bytes), ("chunks", MAX_CHUNKS)):
        value = descriptor.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RolloutError(f"model descriptor {key} must be a positive integer, got {value!r}")
        if value > upper:
            limit = "rollout.max_bundle_bytes" if key == "archive_bytes" else "the chunk limit"
            raise RolloutError(f"model descriptor {key} = {value} exceeds {limit} ({upper})")
    return descriptor


class RolloutReceiver:
    """Collects a published bundle's chunks (paho's thread) and hands the complete archive on.

    `running()` gives the running model's (version, sha256, release): a descriptor for it is not downloaded again (the
    same model signed again under a new release, e.g. to extend its expiry or to roll back, is downloaded).
    `on_complete(descriptor, archive)` and `on_failure(detail)` are called from paho's thread or the agent's
    periodic thread; they must return quickly (the agent queues the work for its model-watcher thread).
    """

    def __init__(
        self,
        topic: str,
        max_bytes: int,
        timeout_s: float,
        subscribe: Callable[[str], None],
        unsubscribe: Callable[[str], None],
        running: Callable[[], tuple],
        on_complete: Callable[[dict, bytes], None],
        on_failure: Callable[[str], None],
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.topic = topic
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._subscribe = subscribe
        self._unsubscribe = unsubscribe
        self._running = running
        self._on_complete = on_complete
        self._on_failure = on_failure
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._current: dict | None = None  # the descriptor being downloaded
        self._chunks: dict[int, bytes] = {}
        self._received = 0
        self._deadline = 0.0
        self._done: set[str] = set()  # transfers handed on or refused: not fetched again on every reconnect
        self._refused_descriptors: set[str] = set()  # sha256 of bad descriptor payloads, reported once

    def subscriptions(self) -> list[str]:
        return [self.topic]

    def handles(self, topic: str) -> bool:
        return topic == self.topic or topic.startswith(self.topic + "/chunks/")

    def on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.topic:
            self._on_descriptor(payload)
        else:
            self._on_chunk(topic, payload)

    def model_changed(self) -> None:
        """A new model runs: any earlier transfer may be fetched again (the ledger refuses releases not newer)."""
        with self._lock:
            self._done.clear()

    def _on_descriptor(self, payload: bytes) -> None:
        if not payload:  # the publisher cleared the topic: nothing to roll out
            return
        try:
            descriptor = check_descriptor(payload, self.max_bytes)
        except RolloutError as exc:
            digest = hashlib.sha256(payload).hexdigest()
            with self._lock:
                if digest in self._refused_descriptors:
                    return
                self._refused_descriptors.add(digest)
            self._on_failure(str(exc))
            return
        transfer = descriptor["transfer_id"]
        version, sha, *rest = self._running()
        release = rest[0] if rest else None
        if descriptor["model_sha256"] == sha and descriptor["version"] == version and descriptor.get("release") == release:
            log.info("rollout: %s %s (transfer %s) is the running model already", descriptor["name"], version, transfer)
            return
        with self._lock:
            if transfer in self._done or (self._current is not None and self._current["transfer_id"] == transfer):
                return
            previous = self._current
            self._current, self._chunks, self._received = descriptor, {}, 0
            self._deadline = self._monotonic() + self.timeout_s
        if previous is not None:
            log.warning("rollout: transfer %s superseded by %s before it completed", previous["transfer_id"], transfer)
            self._unsubscribe(chunk_filter(self.topic, previous["transfer_id"]))
        log.info(
            "rollout: fetching %s %s (transfer %s, %d bytes in %d chunks)",
            descriptor["name"], descriptor["version"], transfer, descriptor["archive_bytes"], descriptor["chunks"],
            extra={"event": "rollout_started", "transfer_id": transfer, "version": descriptor["version"]},
        )
        self._subscribe(chunk_filter(self.topic, transfer))

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        parts = topic[len(self.topic) + 1 :].split("/")  # chunks/<transfer>/<index>
        complete = None
        with self._lock:
            current = self._current
            if current is None or len(parts) != 3 or parts[1] != current["transfer_id"] or not parts[2].isdigit():
                return  # a stale transfer's chunk, or a cleared one (empty payload)
            index = int(parts[2])
            if index >= current["chunks"] or index in self._chunks or not payload:
                return
            if self._received + len(payload) > current["archive_bytes"]:
                failure = f"transfer {current['transfer_id']}: chunks exceed the announced {current['archive_bytes']} bytes"
                self._finish_locked()
            else:
                failure = None
                self._chunks[index] = payload
                self._received += len(payload)
                if len(self._chunks) == current["chunks"]:
                    complete = (current, b"".join(self._chunks[i] for i in range(current["chunks"])))
                    self._finish_locked()
        if failure is not None:
            self._unsubscribe(chunk_filter(self.topic, current["transfer_id"]))
            self._on_failure(failure)
        elif complete is not None:
            self._unsubscribe(chunk_filter(self.topic, current["transfer_id"]))
            log.info("rollout: transfer %s complete (%d bytes)", current["transfer_id"], len(complete[1]))
            self._on_complete(*complete)

    def _finish_locked(self) -> None:
        assert self._current is not None
        self._done.add(self._current["transfer_id"])
        self._current, self._chunks, self._received = None, {}, 0

    def check_timeout(self) -> None:
        """Abandon a transfer whose chunks did not all arrive in time (called by the agent's periodic thread)."""
        with self._lock:
            current = self._current
            if current is None or self._monotonic() < self._deadline:
                return
            got = len(self._chunks)
            self._finish_locked()
        self._unsubscribe(chunk_filter(self.topic, current["transfer_id"]))
        self._on_failure(
            f"transfer {current['transfer_id']} ({current['name']} {current['version']}) incomplete after {self.timeout_s:.0f}s: "
            f"{got} of {current['chunks']} chunks arrived"
        )
