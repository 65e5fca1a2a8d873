"""Signed release numbers, expiry and the rollback ledger (the defences of TUF's threat model that fit a bundle).

A signed bundle's manifest.json (the bytes manifest.json.sig covers) carries

    "release": N          integer >= 1, increasing per bundle name: every signing of a bundle gets a new, higher one
    "expires": "ISO-8601" optional: the bundle is not accepted after this instant (UTC, timezone required)
    "rollback_to": M      optional, M < N: release N deliberately carries the content of the older release M

The daemon remembers, per bundle name, the highest release it accepted (state.directory/releases.json, written
atomically) and refuses any signed bundle whose release is not higher, unless it is exactly the bundle it accepted
under that number (the same manifest bytes: a restart, or a reload of an unchanged folder). So an older, validly
signed bundle replayed on the retained rollout topic is refused (rollback attack), and a signature that was meant
to be short-lived cannot be delivered after its expiry (freeze attack: someone holding back newer releases can
only serve stale ones until they expire). Rolling back is therefore a new release: sign the old content again
under a higher number (`sign-model --release N+1 --rollback-to M`).

Bundles signed before release numbers existed count as release 0: accepted while nothing is remembered for their
name, never after a numbered release. Unsigned bundles (a local folder, signatures not required) carry no trusted
release and are neither checked nor remembered.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

log = logging.getLogger(__name__)

LEDGER_FILE = "releases.json"
LEDGER_SCHEMA_VERSION = 1
MAX_RELEASE = 2**53 - 1  # exact in every JSON reader
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ReleaseError(ValueError):
    """A release field that is malformed, or a bundle the release rules refuse; the message says why."""


@dataclass(frozen=True)
class ReleaseInfo:
    release: int | None  # None: signed before release numbers existed (counts as 0)
    expires: float | None  # unix seconds
    rollback_to: int | None

    def describe(self) -> str:
        text = "no release number" if self.release is None else f"release {self.release}"
        if self.rollback_to is not None:
            text += f" (rolls back to release {self.rollback_to})"
        if self.expires is not None:
            text += f", expires {format_time(self.expires)}"
        return text


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float:
    """ISO-8601 date-time with a timezone (or `Z`) -> unix seconds; ReleaseError otherwise."""
    if not isinstance(text, str):
        raise ReleaseError(f"expected an ISO-8601 time string, got {text!r}")
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ReleaseError(f"{text!r} is not an ISO-8601 time (e.g. 2027-01-31T00:00:00Z)") from None
    if moment.tzinfo is None:
        raise ReleaseError(f"{text!r} has no timezone (write e.g. 2027-01-31T00:00:00Z)")
    return moment.timestamp()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def release_info(manifest: dict) -> ReleaseInfo:
    """The release fields of a parsed manifest, validated; ReleaseError names the bad one."""
    release = manifest.get("release")
    if release is not None and not (_is_int(release) and 1 <= release <= MAX_RELEASE):
        raise ReleaseError(f"manifest.release must be an integer from 1 to {MAX_RELEASE}, got {release!r}")
    expires = manifest.get("expires")
    expires_ts = None
    if expires is not None:
        try:
            expires_ts = parse_time(expires)
        except ReleaseError as exc:
            raise ReleaseError(f"manifest.expires: {exc}") from None
    rollback_to = manifest.get("rollback_to")
    if rollback_to is not None:
        if not (_is_int(rollback_to) and rollback_to >= 1):
            raise ReleaseError(f"manifest.rollback_to must be a positive integer, got {rollback_to!r}")
        if release is None or rollback_to >= release:
            raise ReleaseError(f"manifest.rollback_to ({rollback_to}) must be lower than manifest.release ({release!r})")
    if (expires is not None or rollback_to is not None) and release is None:
        raise ReleaseError("manifest.expires and manifest.rollback_to need manifest.release")
    return ReleaseInfo(release, expires_ts, rollback_to)


def with_release(manifest: dict, release: int, expires: str | None = None, rollback_to: int | None = None) -> dict:
    """A copy of `manifest` carrying these release fields (right after "version"; earlier ones replaced)."""
    fields = {"release": release}
    if expires is not None:
        fields["expires"] = format_time(parse_time(expires))
    if rollback_to is not None:
        fields["rollback_to"] = rollback_to
    out: dict = {}
    for key, value in manifest.items():
        if key in ("release", "expires", "rollback_to"):
            continue
        out[key] = value
        if key == "version":
            out.update(fields)
    if "release" not in out:
        out.update(fields)
    release_info(out)  # the same rules the agent applies
    return out


def parse_expiry(text: str, now: float | None = None) -> str:
    """`--expires`: a duration from now (`30d`, `12h`, `90m`, `2w`, `3600s`) or an ISO-8601 date or time
    (a date means its midnight UTC; a time without timezone means UTC) -> ISO-8601 UTC; it must lie ahead."""
    now = time.time() if now is None else now
    match = _DURATION.match(text)
    if match:
        ts = now + float(match.group(1)) * _UNIT_S[match.group(2)]
    else:
        try:
            moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise ReleaseError(f"--expires {text!r}: give a duration (30d, 12h, 2w) or an ISO-8601 date/time (2027-01-31T00:00:00Z)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        ts = moment.timestamp()
    if ts <= now:
        raise ReleaseError(f"--expires {text!r} lies in the past ({format_time(ts)})")
    return format_time(ts)


def duration_text(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class ReleaseLedger:
    """The highest release accepted per bundle name, kept in state.directory/releases.json.

    `check(bundle)` raises ReleaseError when a signed bundle is older than (or a different bundle under the same
    number as) what was accepted, or expired; `record(bundle)` remembers a bundle that now runs. Thread-safe.
    """

    def __init__(self, directory: str | Path, clock=time.time):
        self.path = Path(directory) / LEDGER_FILE
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, dict] | None = None

    def _load_locked(self) -> dict[str, dict]:
        if self._entries is not None:
            return self._entries
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self._entries = {}
            return self._entries
        except OSError as exc:
            raise ReleaseError(f"cannot read the release ledger {self.path}: {exc}") from None
        try:
            data = json.loads(raw.decode("utf-8"))
            entries = data["bundles"]
            if data.get("schema_version") != LEDGER_SCHEMA_VERSION or not isinstance(entries, dict):
                raise ValueError("unexpected layout")
            for name, entry in entries.items():
                if not (_is_int(entry.get("release")) and entry["release"] >= 0 and isinstance(entry.get("manifest_sha256"), str)):
                    raise ValueError(f"bad entry for {name!r}")
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            # Fail closed: starting over would accept any older release again. The file is written atomically,
            # so this is tampering or a broken disk; an operator decides.
            raise ReleaseError(
                f"the release ledger {self.path} is unreadable ({exc}); it guards against rollbacks, so the agent does not "
                f"guess: restore it, or delete it to accept any signed release once more"
            ) from None
        self._entries = entries
        return entries

    def remembered(self, name: str) -> dict | None:
        with self._lock:
            entry = self._load_locked().get(name)
            return dict(entry) if entry is not None else None

    def check(self, bundle) -> None:
        """Raise ReleaseError when `bundle` (a verified agent.model.Bundle) must not be accepted."""
        if not bundle.signed:
            return
        info: ReleaseInfo = bundle.release_info
        release = info.release or 0
        with self._lock:
            entry = self._load_locked().get(bundle.name)
        if entry is not None:
            if release == entry["release"] and bundle.manifest_sha256 == entry["manifest_sha256"]:
                if info.expires is not None and info.expires <= self.clock():
                    log.warning("model %s release %d expired at %s; it was accepted before and keeps running until a newer release arrives",
                                bundle.name, release, format_time(info.expires))
                return  # the very bundle accepted under this number: a restart or an unchanged reload
            if release <= entry["release"]:
                if info.release is None:
                    raise ReleaseError(
                        f"{bundle.name} {bundle.version} has no signed release number (signed before releases existed) and "
                        f"release {entry['release']} was accepted ({entry.get('version', '?')}): re-sign it with "
                        f"`python -m training sign-model --release {entry['release'] + 1}` to roll it out"
                    )
                same = "a different bundle under the same release number" if release == entry["release"] else "an older release"
                raise ReleaseError(
                    f"rollback refused: {bundle.name} {bundle.version} is release {release}, not newer than release {entry['release']} "
                    f"({entry.get('version', '?')}) accepted before ({same}); to return to older content, sign it again with a "
                    f"higher --release (and --rollback-to)"
                )
        if info.expires is not None and info.expires <= self.clock():
            raise ReleaseError(
                f"{bundle.name} {bundle.version} release {release} expired at {format_time(info.expires)} "
                f"({duration_text(self.clock() - info.expires)} ago): its signature is no longer accepted; sign a new release"
            )

    def admit(self, bundle):
        """`check(bundle)` as the loader's BundleError (reported like any other refused bundle); returns `bundle`."""
        from agent.core.model import BundleError

        try:
            self.check(bundle)
        except ReleaseError as exc:
            raise BundleError(str(exc)) from None
        return bundle

    def record(self, bundle) -> None:
        """Remember a signed bundle that now runs (atomic write); a failed write is logged, memory keeps it."""
        if not bundle.signed:
            return
        release = bundle.release_info.release or 0
        with self._lock:
            try:
                entries = self._load_locked()
            except ReleaseError as exc:
                log.warning("%s", exc)
                return
            entry = entries.get(bundle.name)
            if entry is not None and (entry["release"], entry["manifest_sha256"]) == (release, bundle.manifest_sha256):
                return
            if entry is not None and release < entry["release"]:
                return  # never lower the mark (check() refused such a bundle already)
            entries[bundle.name] = {
                "release": release, "manifest_sha256": bundle.manifest_sha256, "version": bundle.version,
                "accepted_at": format_time(self.clock()),
            }
            try:
                self._write_locked(entries)
            except OSError as exc:
                log.warning("cannot write the release ledger %s: %s (release %d of %s is remembered until the agent stops)",
                            self.path, exc, release, bundle.name)

    def _write_locked(self, entries: dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        data = json.dumps({"schema_version": LEDGER_SCHEMA_VERSION, "bundles": entries}, indent=2, sort_keys=True) + "\n"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        try:
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
