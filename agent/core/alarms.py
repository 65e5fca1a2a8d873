"""Operators in the loop: acknowledged, shelved and out-of-service alarms, and the operators' verdict on each.

The rules follow ISA-18.2 / IEC 62682 as a small plant needs them:
- acknowledge: an operator has seen the alert; its later events and the active list say by whom and when;
- shelve: an alert, or every alert of a device, is kept off the outputs for a bounded time; it comes back by
  itself when the time runs out (an alert still open is then announced again), and an `end` of an alert the
  subscribers knew of is always published, so nobody keeps an alert open that is over;
- maintenance (out of service): a device raises no alerts at all, its open alerts end when it starts, its
  forecasts are marked, and when it ends the device's window and detector start over (the machine may have
  changed) and, where configured, it learns its normal again;
- feedback: `true_fault`, `false_alarm` or `unknown` per alert, with a comment: the labels retraining needs
  (`edgecast-agent export-feedback`).

The book is changed only on the worker thread, between two batches, with the pipeline idle (agent/core/engine.py);
the publisher reads it while it publishes, and everything else reads snapshots under the lock. It is saved to
`alarms.json` in the state directory after every change, so it survives restarts.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from agent.core.events import AlertEvent

log = logging.getLogger(__name__)

ALARMS_FILE = "alarms.json"
KNOWN_ALERTS_MAX = 20_000  # alerts remembered for acknowledgement and feedback; the oldest ended ones go first
LABELS = ("true_fault", "false_alarm", "unknown")


@dataclass
class Outcome:
    """What a command did: ok, or refused with a reason code and a detail a person can act on."""

    ok: bool
    reason: str | None = None
    detail: str = ""


class AlarmBook:
    """Acknowledgements, shelves, maintenance and feedback, by alert id and device; persisted as JSON."""

    def __init__(self, directory: str | Path, max_shelve_s: float, max_maintenance_s: float):
        self.path = Path(directory) / ALARMS_FILE
        self.max_shelve_s = max_shelve_s
        self.max_maintenance_s = max_maintenance_s
        self._lock = threading.Lock()
        self.acks: dict[str, dict] = {}  # alert id -> {"by", "at", "reason"}
        self.shelved_alerts: dict[str, dict] = {}  # alert id -> {"until", "by", "at", "reason", "device"}
        self.shelved_devices: dict[str, dict] = {}  # device -> {"until", "by", "at", "reason"}
        self.maintenance: dict[str, dict] = {}  # device -> {"since", "until" (or None: until cleared), "by", "reason"}
        self.feedback: dict[str, dict] = {}  # alert id -> {"label", "comment", "by", "at", "device", "started_at", "ended_at"}
        self.alerts: dict[str, dict] = {}  # alert id -> {"device", "started_at", "ended_at", "announced"}
        self.counts = {"commands": {}, "suppressed": 0}
        self.dirty = False  # alerts seen since the last save (saved by the periodic job and at stop)

    # -- what the publisher asks, per event -------------------------------------------------------------------

    def active(self) -> bool:
        """Anything that can change what is published (the publisher's fast path when False)."""
        return bool(self.acks or self.shelved_alerts or self.shelved_devices or self.maintenance)

    def in_maintenance(self, device: str) -> bool:
        return device in self.maintenance

    def admit(self, event: AlertEvent) -> bool:
        """Record an alert event; True when it is published. Suppressed: every event of a device in maintenance, and
        `new`/`update` of a shelved alert or device; an `end` goes out when its alert was announced."""
        with self._lock:
            known = self.alerts.get(event.alert_id)
            if known is None:
                known = self.alerts[event.alert_id] = {"device": event.device, "started_at": event.started_at, "ended_at": None,
                                                       "announced": False}
                self._forget_old()
            self.dirty = True
            if event.state == "end":
                known["ended_at"] = event.ended_at
                self.shelved_alerts.pop(event.alert_id, None)
                self.acks.pop(event.alert_id, None)  # a cleared alarm is back to normal: nothing left to acknowledge
                publish = known["announced"] and event.device not in self.maintenance
                known["announced"] = False
            else:
                publish = not self._hidden(event.alert_id, event.device)
                known["announced"] = known["announced"] or publish
            if not publish:
                self.counts["suppressed"] += 1
            return publish

    def annotation(self, alert_id: str, device: str) -> dict:
        """The operator state of an alert, for its payload and the active list (empty when there is none)."""
        out = {}
        ack = self.acks.get(alert_id)
        if ack is not None:
            out["acknowledged"] = {"by": ack["by"], "at": ack["at"]}
        shelf = self.shelved_alerts.get(alert_id) or self.shelved_devices.get(device)
        if shelf is not None:
            out["shelved_until"] = shelf["until"]
        return out

    def device_annotation(self, device: str) -> dict:
        """The device's own operator state, for its active list."""
        out = {}
        service = self.maintenance.get(device)
        if service is not None:
            out["maintenance"] = {k: service[k] for k in ("since", "until", "by", "reason")}
        shelf = self.shelved_devices.get(device)
        if shelf is not None:
            out["shelved_until"] = shelf["until"]
        return out

    def _hidden(self, alert_id: str, device: str) -> bool:
        return device in self.maintenance or alert_id in self.shelved_alerts or device in self.shelved_devices

    # -- commands (worker thread, between batches) --------------------------------------------------------------

    def acknowledge(self, device: str, alert_ids: list[str], by: str, reason: str, now: float) -> Outcome:
        for alert_id in alert_ids:
            self.acks[alert_id] = {"by": by, "at": round(now, 3), "reason": reason}
        self._save()
        return Outcome(True, detail=f"acknowledged {len(alert_ids)} alert(s)")

    def shelve(self, device: str, alert_id: str | None, duration_s: float, by: str, reason: str, now: float) -> Outcome:
        if duration_s > self.max_shelve_s:
            return Outcome(False, "too_long", f"duration_s {duration_s:g} > alarms.max_shelve_s {self.max_shelve_s:g}")
        entry = {"until": round(now + duration_s, 3), "by": by, "at": round(now, 3), "reason": reason}
        if alert_id is None:
            self.shelved_devices[device] = entry
        else:
            self.shelved_alerts[alert_id] = {**entry, "device": device}
        self._save()
        return Outcome(True, detail=f"shelved until {entry['until']:.0f}")

    def unshelve(self, device: str, alert_id: str | None) -> Outcome:
        removed = self.shelved_devices.pop(device, None) if alert_id is None else self.shelved_alerts.pop(alert_id, None)
        if removed is None:
            return Outcome(False, "not_shelved", f"{'device ' + device if alert_id is None else 'alert ' + alert_id} is not shelved")
        self._save()
        return Outcome(True, detail="unshelved")

    def check_maintenance(self, until: float | None, now: float) -> Outcome:
        """Whether a maintenance period ending at `until` (None: until ended) may start now."""
        if until is not None and until - now > self.max_maintenance_s:
            return Outcome(False, "too_long", f"maintenance of {until - now:g} s > alarms.max_maintenance_s {self.max_maintenance_s:g}")
        if until is not None and until <= now:
            return Outcome(False, "invalid_command", "`until` is in the past")
        return Outcome(True)

    def start_maintenance(self, device: str, until: float | None, by: str, reason: str, now: float) -> Outcome:
        checked = self.check_maintenance(until, now)
        if not checked.ok:
            return checked
        self.maintenance[device] = {"since": round(now, 3), "until": None if until is None else round(until, 3), "by": by, "reason": reason}
        self._save()
        return Outcome(True, detail="out of service" + ("" if until is None else f" until {until:.0f}"))

    def end_maintenance(self, device: str) -> Outcome:
        if self.maintenance.pop(device, None) is None:
            return Outcome(False, "not_in_maintenance", f"device {device} is not in maintenance")
        self._save()
        return Outcome(True, detail="back in service")

    def give_feedback(self, device: str, alert_id: str, label: str, comment: str, by: str, now: float) -> Outcome:
        known = self.alerts.get(alert_id)
        if known is None or known["device"] != device:
            return Outcome(False, "unknown_alert", f"no alert {alert_id} of device {device} is known to this agent")
        self.feedback[alert_id] = {"label": label, "comment": comment, "by": by, "at": round(now, 3), "device": device,
                                   "started_at": known["started_at"], "ended_at": known["ended_at"]}
        self._save()
        return Outcome(True, detail=f"feedback {label} recorded")

    def expired(self, now: float) -> tuple[list[tuple[str, str | None]], list[str]]:
        """Shelves and maintenance periods whose time ran out, removed: ([(device, alert id or None)], [device])."""
        with self._lock:
            shelves = [(entry["device"], alert_id) for alert_id, entry in self.shelved_alerts.items() if entry["until"] <= now]
            shelves += [(device, None) for device, entry in self.shelved_devices.items() if entry["until"] <= now]
            services = [device for device, entry in self.maintenance.items() if entry["until"] is not None and entry["until"] <= now]
        return shelves, services

    def drop_shelf(self, device: str, alert_id: str | None) -> None:
        (self.shelved_devices.pop(device, None) if alert_id is None else self.shelved_alerts.pop(alert_id, None))
        self._save()

    def count_command(self, command: str, ok: bool) -> None:
        with self._lock:
            key = f"{command}:{'ok' if ok else 'refused'}"
            self.counts["commands"][key] = self.counts["commands"].get(key, 0) + 1

    # -- reading ----------------------------------------------------------------------------------------------

    def summary(self) -> dict:
        with self._lock:
            return {"acknowledged": len(self.acks), "shelved": len(self.shelved_alerts) + len(self.shelved_devices),
                    "in_maintenance": len(self.maintenance), "feedback": len(self.feedback)}

    def feedback_by_label(self) -> dict[str, int]:
        with self._lock:
            out = dict.fromkeys(LABELS, 0)
            for entry in self.feedback.values():
                out[entry["label"]] += 1
            return out

    def commands_counted(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts["commands"])

    # -- persistence --------------------------------------------------------------------------------------------

    def load(self) -> None:
        if not self.path.is_file():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            for key in ("acks", "shelved_alerts", "shelved_devices", "maintenance", "feedback", "alerts"):
                value = data.get(key, {})
                if not isinstance(value, dict):
                    raise ValueError(f"{key} is not an object")
                setattr(self, key, value)
        except (OSError, ValueError) as exc:
            log.error("operator state in %s unreadable (%s): starting without acknowledgements, shelves, maintenance or "
                      "feedback; the file is kept as %s", self.path, exc, self.path.with_suffix(".unreadable"))
            try:
                self.path.replace(self.path.with_suffix(".unreadable"))
            except OSError:
                pass
            return
        log.info("operator state restored: %s", self.summary())

    def _save(self) -> None:
        with self._lock:
            data = {"acks": self.acks, "shelved_alerts": self.shelved_alerts, "shelved_devices": self.shelved_devices,
                    "maintenance": self.maintenance, "feedback": self.feedback, "alerts": self.alerts}
            text = json.dumps(data)
            self.dirty = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot write the operator state to %s: %s; it is lost at a restart", self.path, exc)

    def save(self) -> None:
        self._save()

    def save_if_changed(self) -> None:
        """The periodic job: alerts seen since the last save, so that feedback on them is taken after a restart."""
        if self.dirty:
            self._save()

    def _forget_old(self) -> None:
        """Keep the alert index bounded: the oldest ended alerts without feedback go first."""
        if len(self.alerts) <= KNOWN_ALERTS_MAX:
            return
        ended = sorted((entry["ended_at"], alert_id) for alert_id, entry in self.alerts.items()
                       if entry["ended_at"] is not None and alert_id not in self.feedback)
        for _, alert_id in ended[: len(self.alerts) - KNOWN_ALERTS_MAX]:
            self.alerts.pop(alert_id, None)
            self.acks.pop(alert_id, None)


def feedback_rows(book_path: Path, now: float) -> list[dict]:
    """The feedback of an alarms.json as CSV rows (docs/contracts.md, "Feedback labels (CSV)"), oldest alert first."""
    from datetime import datetime, timezone

    def iso(ts: float) -> str:
        return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    data = json.loads(Path(book_path).read_text(encoding="utf-8"))
    rows = []
    for alert_id, entry in sorted(data.get("feedback", {}).items(), key=lambda item: item[1]["started_at"]):
        end = entry["ended_at"] if entry["ended_at"] is not None else data.get("alerts", {}).get(alert_id, {}).get("ended_at")
        rows.append({"device": entry["device"], "start": iso(entry["started_at"]), "end": iso(end if end is not None else now),
                     "label": entry["label"], "alert_id": alert_id, "by": entry["by"], "at": iso(entry["at"]),
                     "comment": entry.get("comment", "")})
    return rows
